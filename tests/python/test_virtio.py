"""Virtio devices from Python: disks, entropy and network devices added to a VM, driven by the
mmio-script guest (which replays the register writes a driver makes), filters called on the
device's worker thread, and VMs whose devices are linked."""

from __future__ import annotations

import gc
import logging
import struct
import threading

import pytest

import vmcore

from test_foundation import _baseline_counts, _counts_back_to
from test_lifecycle import resident_bytes

SCRIPT = 0x20_0000
QUEUE = 0x30_0000
QUEUE_SIZE = 8
HEADER = 0x31_0000
DATA = 0x31_1000


def rings(n: int) -> tuple:
    desc = QUEUE + 0x1000 * n
    return desc, desc + 16 * QUEUE_SIZE, desc + 0x800


class Script:
    """The program the mmio-script guest runs: 16-byte entries (address, value, op)."""

    def __init__(self) -> None:
        self.ops = b""

    def op(self, address: int, value: int, op: int) -> None:
        self.ops += struct.pack("<QII", address, value, op)

    def write(self, address: int, value: int) -> None:
        self.op(address, value, 1)

    def wait16(self, address: int, value: int) -> None:
        self.op(address, value, 2)

    def bring_up(self, base: int, queues: list) -> None:
        self.write(base + 0x70, 3)
        self.write(base + 0x24, 1)
        self.write(base + 0x20, 1)  # VERSION_1 in the high word
        self.write(base + 0x70, 3 | 8)
        for i, n in enumerate(queues):
            desc, avail, used = rings(n)
            self.write(base + 0x30, i)
            self.write(base + 0x38, QUEUE_SIZE)
            for reg, addr in ((0x80, desc), (0x90, avail), (0xA0, used)):
                self.write(base + reg, addr)
                self.write(base + reg + 4, 0)
            self.write(base + 0x44, 1)
        self.write(base + 0x70, 3 | 8 | 4)

    def load(self, vm: vmcore.Vm) -> None:
        self.op(0, 0, 0)
        vm.write_phys(SCRIPT, self.ops)


def desc(vm: vmcore.Vm, n: int, index: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
    vm.write_phys(rings(n)[0] + 16 * index, struct.pack("<QIHH", addr, length, flags, nxt))


def frame(tag: int, length: int) -> bytes:
    return b"\xff" * 6 + bytes([2, 0, 0, 0, 0, tag]) + b"\x88\xb5" + bytes([tag]) * (length - 14)


def net_guest(vm: vmcore.Vm, net: vmcore.Net, guests, send: bytes = b"") -> None:
    """Loads a guest that brings `net` up, posts a receive buffer at DATA, sends `send` if
    given, and ends once the receive buffer is used."""
    s = Script()
    s.bring_up(net.device.base, [0, 1])
    s.write(net.device.base + 0x50, 0)
    if send:
        vm.write_phys(HEADER, bytes(12) + send)
        desc(vm, 1, 0, HEADER, 12 + len(send), 0)
        vm.write_phys(rings(1)[1] + 2, struct.pack("<H", 1))
        s.write(net.device.base + 0x50, 1)
    s.wait16(rings(0)[2] + 2, 1)
    s.load(vm)
    desc(vm, 0, 0, DATA, 2048, 2)
    vm.write_phys(rings(0)[1] + 2, struct.pack("<H", 1))
    vm.load_flat(guests.bytes("mmio-script.bin"))


def received(vm: vmcore.Vm, length: int) -> bytes:
    used_len = struct.unpack("<I", vm.read_phys(rings(0)[2] + 8, 4))[0]
    assert used_len == 12 + length
    return vm.read_phys(DATA + 12, length)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(b"".join(bytes([s]) * 512 for s in range(16)))
    return path


def test_disks_and_rng_are_described(vm_factory, image):
    vm = vm_factory(memory="32M")
    disk = vm.add_disk(image, readonly=True, serial="vmcore-0")
    assert (disk.index, disk.kind, disk.base, disk.gsi) == (0, "block", 0xD000_0000, 16)
    rng = vm.add_rng()
    assert (rng.index, rng.kind, rng.gsi) == (1, "rng", 17)
    assert [d.kind for d in vm.virtio_devices] == ["block", "rng"]
    with pytest.raises(vmcore.ConfigError, match="at most 20 bytes"):
        vm.add_disk(image, serial="x" * 21)
    with pytest.raises(vmcore.VmIOError, match="cannot open disk image"):
        vm.add_disk(image.parent / "missing.img")
    with pytest.raises(vmcore.ConfigError, match="MAC"):
        vm.add_net(mac="01:02:03")


def test_a_guest_reads_a_disk(vm_factory, guests, image):
    vm = vm_factory(memory="32M")
    disk = vm.add_disk(image)
    s = Script()
    s.bring_up(disk.base, [0])
    s.write(disk.base + 0x50, 0)
    s.wait16(rings(0)[2] + 2, 1)
    s.load(vm)
    vm.write_phys(HEADER, struct.pack("<IIQ", 0, 0, 5))
    desc(vm, 0, 0, HEADER, 16, 1, 1)
    desc(vm, 0, 1, DATA, 512, 3, 2)
    desc(vm, 0, 2, DATA + 512, 1, 2)
    vm.write_phys(rings(0)[1] + 2, struct.pack("<H", 1))
    vm.load_flat(guests.bytes("mmio-script.bin"))
    assert vm.run(timeout=20).reason == "debug_exit"
    assert vm.read_phys(DATA, 513) == bytes([5]) * 512 + b"\0"
    with pytest.raises(vmcore.VmStateError, match="before the VM first runs"):
        vm.add_disk(image)


def test_linked_vms_exchange_frames_through_python_filters(vm_factory, guests):
    a, b = vm_factory(memory="32M"), vm_factory(memory="32M")
    seen = []
    threads = set()

    def watch(data: bytes) -> None:
        # Runs on the device's worker thread; the VM may be used from here.
        seen.append(data)
        threads.add(threading.get_ident())
        assert a_net.stats["tx_frames"] == 0

    a_net = a.add_net(on_packet=watch, mac="02:00:00:00:00:0a")
    b_net = b.add_net()
    assert a_net.mac == "02:00:00:00:00:0a" and a_net.tap is None and a_net.device.kind == "net"
    a_net.link(b_net)
    net_guest(a, a_net, guests, send=frame(0xA1, 64))
    net_guest(b, b_net, guests, send=frame(0xB2, 100))
    a.start(timeout=20)
    b.start(timeout=20)
    assert a.wait().reason == "debug_exit" and b.wait().reason == "debug_exit"
    assert received(a, 100) == frame(0xB2, 100)
    assert received(b, 64) == frame(0xA1, 64)
    assert seen == [frame(0xA1, 64)]
    assert threads and threading.get_ident() not in threads
    assert a_net.stats == {"tx_frames": 1, "tx_dropped": 0, "rx_frames": 1, "rx_dropped": 0}


def test_a_filter_drops_frames_and_a_failing_one_is_logged(vm_factory, guests, caplog):
    a, b = vm_factory(memory="32M"), vm_factory(memory="32M")
    a_net, b_net = a.add_net(on_packet=lambda f: False), b.add_net()
    b_net.on_packet(lambda f: 1 / 0)
    a_net.link(b_net)
    net_guest(a, a_net, guests, send=frame(1, 60))
    net_guest(b, b_net, guests, send=frame(2, 60))
    caplog.set_level(logging.WARNING, logger="vmcore")
    vmcore.refresh_logging()
    a.start(timeout=1)
    b.start(timeout=1)
    assert a.wait().reason == "timeout" and b.wait().reason == "timeout", "nothing got through"
    assert a_net.stats["tx_dropped"] == 1 and b_net.stats["tx_dropped"] == 1
    assert "ZeroDivisionError" in caplog.text


def test_injected_frames_reach_a_running_guest(vm_factory, guests):
    vm = vm_factory(memory="32M")
    net = vm.add_net()
    net_guest(vm, net, guests)
    vm.start(timeout=20)
    net.inject(frame(0xC3, 200))
    assert vm.wait().reason == "debug_exit"
    assert received(vm, 200) == frame(0xC3, 200)
    with pytest.raises(vmcore.ConfigError, match="14 to 1518 bytes"):
        net.inject(b"short")


def test_devices_leave_no_threads_or_descriptors_behind(vm_factory, guests, image):
    warm = vm_factory(memory="32M")
    warm.add_net()
    warm.close()
    gc.collect()
    fds, threads = _baseline_counts()
    for _ in range(2):
        a, b = vmcore.Vm(memory="32M"), vmcore.Vm(memory="32M")
        a.add_disk(image)
        a.add_disk(image, readonly=True)
        a.add_rng()
        a_net, b_net = a.add_net(on_packet=lambda f: None), b.add_net()
        a_net.link(b_net)
        net_guest(b, b_net, guests)
        b.start()
        a.close()
        b.close()
        del a_net, b_net
    gc.collect()
    assert _counts_back_to((fds, threads)) == (fds, threads)


def test_a_virtio_console_carries_text_both_ways(vm_factory, guests):
    vm = vm_factory(memory="32M")
    hvc = vm.add_console()
    (device,) = vm.virtio_devices
    assert device.kind == "console"
    s = Script()
    s.bring_up(device.base, [0, 1])
    vm.write_phys(HEADER, b"hello from hvc0\n")
    desc(vm, 1, 0, HEADER, 16, 0)
    vm.write_phys(rings(1)[1] + 2, struct.pack("<H", 1))
    s.write(device.base + 0x50, 1)
    s.wait16(rings(0)[2] + 2, 1)
    s.load(vm)
    desc(vm, 0, 0, DATA, 64, 2)
    vm.write_phys(rings(0)[1] + 2, struct.pack("<H", 1))
    vm.load_flat(guests.bytes("mmio-script.bin"))
    vm.start(timeout=20)
    assert hvc.expect(r"hello from (\w+)", timeout=10).group(1) == "hvc0"
    hvc.send("typed")
    assert vm.wait().reason == "debug_exit"
    assert vm.read_phys(DATA, 5) == b"typed"
    assert "hvc0" not in vm.console.output, "COM1 is a separate console"
    with pytest.raises(vmcore.ConsoleClosed):
        hvc.expect("never printed", timeout=5)


def test_a_guest_flooding_its_virtio_console_costs_the_host_a_bounded_amount(vm_factory, guests):
    # The guest posts one 64 KiB transmit buffer, waits for the device to use it and posts it
    # again, for 5 s: the host keeps the newest console_limit bytes and counts the rest.
    vm = vm_factory(memory="32M", console_limit=8 << 20)
    hvc = vm.add_console()
    (device,) = vm.virtio_devices
    _, avail, used = rings(1)
    s = Script()
    s.bring_up(device.base, [0, 1])
    desc(vm, 1, 0, DATA, 64 << 10, 0)  # every avail ring slot (zero) names descriptor 0
    again = len(s.ops) // 16
    s.op(avail + 2, 1, 5)  # avail.idx += 1
    s.write(device.base + 0x50, 1)  # notify the transmit queue
    s.op(used + 2, avail + 2, 6)  # wait until used.idx == avail.idx
    s.op(0, again, 4)
    s.load(vm)
    vm.write_phys(DATA, b"flood\n" * ((64 << 10) // 6) + b"!" * ((64 << 10) % 6))
    vm.load_flat(guests.bytes("mmio-script.bin"))
    before = resident_bytes()
    assert vm.run(timeout=5).reason == "timeout"
    grown = resident_bytes() - before
    printed = hvc.dropped + len(hvc.output_bytes)
    assert printed > 256 << 20, f"the guest printed only {printed >> 20} MiB"
    assert grown < 64 << 20, f"host memory grew by {grown >> 20} MiB while the guest printed {printed >> 20} MiB"
    assert vm.stats()["console_dropped"] == hvc.dropped > 0
    assert 8 << 20 <= len(hvc.output_bytes) <= 9 << 20
