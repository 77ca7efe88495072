"""The scripted ping peer the Linux virtio-net test talks to: its replies are well-formed."""

from __future__ import annotations

import struct

from netpeer import PingPeer, internet_checksum, ip_bytes, mac_bytes

GUEST_MAC = mac_bytes("02:00:00:00:00:0f")
GUEST_IP = ip_bytes("10.0.2.15")
BROADCAST = b"\xff" * 6


def arp_request(target: str) -> bytes:
    arp = b"\x00\x01\x08\x00\x06\x04" + struct.pack("!H", 1) + GUEST_MAC + GUEST_IP + b"\0" * 6 + ip_bytes(target)
    return BROADCAST + GUEST_MAC + b"\x08\x06" + arp


def echo_request(target: str, sequence: int) -> bytes:
    icmp = struct.pack("!BBHHH", 8, 0, 0, 0x1234, sequence) + b"payload!"
    icmp = icmp[:2] + struct.pack("!H", internet_checksum(icmp)) + icmp[4:]
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 7, 0, 64, 1, 0, GUEST_IP, ip_bytes(target))
    header = header[:10] + struct.pack("!H", internet_checksum(header)) + header[12:]
    return b"\x02\x00\x00\x00\x00\x02" + GUEST_MAC + b"\x08\x00" + header + icmp


def test_an_arp_request_for_the_peer_gets_its_mac() -> None:
    peer = PingPeer(ip="10.0.2.2", mac="02:00:00:00:00:02")
    reply = peer.reply_to(arp_request("10.0.2.2"))
    assert reply is not None
    assert reply[:6] == GUEST_MAC and reply[6:12] == peer.mac and reply[12:14] == b"\x08\x06"
    arp = reply[14:]
    assert struct.unpack("!H", arp[6:8]) == (2,)
    assert arp[8:14] == peer.mac and arp[14:18] == peer.ip and arp[18:24] == GUEST_MAC and arp[24:28] == GUEST_IP
    assert peer.reply_to(arp_request("10.0.2.3")) is None  # someone else's address


def test_an_echo_request_gets_an_echo_reply_with_valid_checksums() -> None:
    peer = PingPeer(ip="10.0.2.2")
    reply = peer.reply_to(echo_request("10.0.2.2", sequence=5))
    assert reply is not None and reply[12:14] == b"\x08\x00"
    header, icmp = reply[14:34], reply[34:]
    assert internet_checksum(header) == 0 and internet_checksum(icmp) == 0
    assert header[12:16] == peer.ip and header[16:20] == GUEST_IP
    assert icmp[0] == 0 and struct.unpack("!HH", icmp[4:8]) == (0x1234, 5) and icmp[8:] == b"payload!"
    assert peer.echo_requests == 1
    assert peer.reply_to(echo_request("10.0.2.9", sequence=6)) is None
    assert peer.reply_to(b"short") is None
