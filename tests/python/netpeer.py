"""A scripted network peer for virtio-net tests: answers ARP requests for its address and ICMP
echo requests to it, through a VM's ``on_packet`` filter and ``Net.inject``, with no host
networking. Enough of IPv4 for ``ping`` from a guest; everything else is only recorded."""

from __future__ import annotations

import struct
import threading
from typing import List, Optional

import vmcore

ETHERTYPE_ARP = 0x0806
ETHERTYPE_IPV4 = 0x0800
ARP_REQUEST, ARP_REPLY = 1, 2
IPPROTO_ICMP = 1
ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST = 0, 8
MIN_ETHERNET_FRAME = 60  # without the FCS; shorter frames are padded


def internet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def mac_bytes(text: str) -> bytes:
    return bytes(int(part, 16) for part in text.split(":"))


def ip_bytes(text: str) -> bytes:
    return bytes(int(part) for part in text.split("."))


class PingPeer:
    """Answers ARP and ping for ``ip`` with ``mac``. Pass :meth:`on_packet` as a VM's
    ``on_packet`` and set :attr:`net` to the :class:`vmcore.Net` it was given to."""

    def __init__(self, ip: str = "10.0.2.2", mac: str = "02:00:00:00:00:02") -> None:
        self.ip, self.mac = ip_bytes(ip), mac_bytes(mac)
        self.net: Optional[vmcore.Net] = None
        self.echo_requests = 0
        self.arp_requests = 0
        self.frames: List[bytes] = []
        self._lock = threading.Lock()

    def on_packet(self, frame: bytes) -> bool:
        """Records the guest's frame and answers it if it is for this peer."""
        with self._lock:
            self.frames.append(frame)
        reply = self.reply_to(frame)
        if reply is not None and self.net is not None:
            self.net.inject(reply.ljust(MIN_ETHERNET_FRAME, b"\0"))
        return True

    def reply_to(self, frame: bytes) -> Optional[bytes]:
        if len(frame) < 14:
            return None
        source = frame[6:12]
        (ethertype,) = struct.unpack("!H", frame[12:14])
        payload = frame[14:]
        if ethertype == ETHERTYPE_ARP:
            answer = self._arp_reply(payload)
        elif ethertype == ETHERTYPE_IPV4:
            answer = self._echo_reply(payload)
        else:
            return None
        if answer is None:
            return None
        return source + self.mac + struct.pack("!H", ethertype) + answer

    def _arp_reply(self, arp: bytes) -> Optional[bytes]:
        # Ethernet/IPv4 ARP: htype 1, ptype 0x0800, hlen 6, plen 4.
        if len(arp) < 28 or arp[:6] != b"\x00\x01\x08\x00\x06\x04":
            return None
        (operation,) = struct.unpack("!H", arp[6:8])
        sender_mac, sender_ip, target_ip = arp[8:14], arp[14:18], arp[24:28]
        if operation != ARP_REQUEST or target_ip != self.ip:
            return None
        self.arp_requests += 1
        return arp[:6] + struct.pack("!H", ARP_REPLY) + self.mac + self.ip + sender_mac + sender_ip

    def _echo_reply(self, packet: bytes) -> Optional[bytes]:
        if len(packet) < 20 or packet[0] >> 4 != 4:
            return None
        header_length = (packet[0] & 0x0F) * 4
        (total_length,) = struct.unpack("!H", packet[2:4])
        protocol, source, destination = packet[9], packet[12:16], packet[16:20]
        if protocol != IPPROTO_ICMP or destination != self.ip or total_length > len(packet):
            return None
        icmp = packet[header_length:total_length]
        if len(icmp) < 8 or icmp[0] != ICMP_ECHO_REQUEST:
            return None
        self.echo_requests += 1
        # The same identifier, sequence number and data, as an echo reply.
        body = struct.pack("!BBH", ICMP_ECHO_REPLY, 0, 0) + icmp[4:]
        body = body[:2] + struct.pack("!H", internet_checksum(body)) + body[4:]
        header = bytearray(packet[:header_length])
        header[8] = 64  # TTL
        header[10:12] = b"\0\0"
        header[12:16], header[16:20] = destination, source
        header[10:12] = struct.pack("!H", internet_checksum(bytes(header)))
        return bytes(header) + body
