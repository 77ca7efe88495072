"""Linux: loading errors, and Debian's cloud kernel booted to a busybox shell that drives vmcore's
virtio network, entropy and console devices (slow here: this host runs guest kernel code through
KVM's instruction emulator)."""

from __future__ import annotations

from pathlib import Path
from typing import List

import pytest

import vmcore
from vmcore.pytest_plugin import linux_guest_path

from netpeer import PingPeer


@pytest.fixture
def kernel(pytestconfig: pytest.Config) -> Path:
    path = linux_guest_path(pytestconfig, "kernel")
    if not path.is_file():
        pytest.skip(f"no Linux kernel at {path}: run scripts/linux-guest")
    return path


def test_a_text_file_is_not_a_kernel(vm: vmcore.Vm, tmp_path: Path) -> None:
    text = tmp_path / "vmlinuz"
    text.write_text("#!/bin/sh\necho this is not a kernel\n")
    with pytest.raises(vmcore.LoadError, match="not a Linux kernel"):
        vm.load_linux(text)
    with pytest.raises(vmcore.LoadError, match="not a Linux kernel|neither"):
        vm.load_kernel(text, "console=ttyS0")


def test_a_truncated_kernel_is_refused(vm: vmcore.Vm, kernel: Path, tmp_path: Path) -> None:
    image = kernel.read_bytes()
    cut = tmp_path / "vmlinuz"
    cut.write_bytes(image[: len(image) // 2])
    with pytest.raises(vmcore.LoadError, match="truncated"):
        vm.load_linux(cut)
    assert vm.outcome is None  # nothing ran, nothing half-loaded was entered


def test_the_debian_kernel_loads_with_host_decompression(vm_factory, kernel: Path) -> None:
    machine = vm_factory(memory="256M")
    loaded = machine.load_linux(kernel, cmdline="console=ttyS0 quiet")
    assert loaded.format == "bzImage"
    assert loaded.compression in ("gzip", "xz", "lz4", "zstd")
    version = (kernel.parent / "version").read_text().strip() if (kernel.parent / "version").is_file() else None
    assert loaded.version and (version is None or loaded.version.startswith(version))
    assert loaded.protocol in ("pvh", "linux64")
    # A VM too small for the kernel is refused before anything is written.
    small = vm_factory(memory="32M")
    with pytest.raises(vmcore.LoadError, match="needs .* MiB|does not fit"):
        small.load_linux(kernel)


GUEST_IP, PEER_IP = "10.0.2.15", "10.0.2.2"
peer = PingPeer(ip=PEER_IP)
extra_console: List[vmcore.Console] = []


def add_virtio_devices(vm: vmcore.Vm) -> None:
    """Before boot: a network card whose only peer is `peer`, an entropy source, a second
    console. The initramfs loads their drivers (vmcore.modules=)."""
    peer.net = vm.add_net(on_packet=peer.on_packet)
    vm.add_rng()
    extra_console.append(vm.add_console())


@pytest.mark.slow
@pytest.mark.linux(
    vcpus=2,
    memory="256M",
    cmdline="console=ttyS0 vmcore.modules=virtio_mmio,virtio_net,virtio_rng,virtio_console",
    setup=add_virtio_devices,
)
def test_debian_kernel_boots_to_a_shell_on_two_cpus_with_virtio_net_rng_and_console(
    linux_vm: vmcore.Vm, kernel: Path
) -> None:
    version_file = kernel.parent / "version"
    console = linux_vm.console
    console.send("uname -r\n")
    if version_file.is_file():
        console.expect(version_file.read_text().strip(), timeout=120)
    else:
        console.expect(r"\d+\.\d+\.\d+", timeout=120)
    console.send("grep -c ^processor /proc/cpuinfo\n")
    console.expect(r"(?m)^2\r?$", timeout=120)

    # virtio-net: the guest pings a peer that exists only as this script's on_packet filter.
    console.send(f"ip link set eth0 up; ip addr add {GUEST_IP}/24 dev eth0; ping -c 3 -W 10 {PEER_IP}\n")
    console.expect(r"3 packets transmitted, 3 packets received", timeout=300)
    assert peer.arp_requests >= 1 and peer.echo_requests == 3

    # virtio-rng: the kernel picked the device as its hardware RNG, and it gives bytes.
    console.send("cat /sys/class/misc/hw_random/rng_current; head -c 64 /dev/hwrng | wc -c\n")
    console.expect(r"virtio_rng\.\d+", timeout=120)
    console.expect(r"(?m)^64\r?$", timeout=120)

    # virtio-console: /dev/hvc0 both ways.
    hvc = extra_console[0]
    console.send('exec 3<>/dev/hvc0; echo written-to-hvc0 >&3; read line <&3; echo "hvc0 said $line"; exec 3>&-\n')
    hvc.expect("written-to-hvc0", timeout=120)
    hvc.send(b"sent-by-the-host\n")
    console.expect("hvc0 said sent-by-the-host", timeout=120)

    console.send("poweroff -f\n")
    outcome = linux_vm.wait(timeout=300)
    assert outcome is not None and outcome.reason == "poweroff", outcome


@pytest.mark.slow
def test_without_an_initrd_the_kernel_cannot_mount_root(vm_factory, kernel: Path) -> None:
    machine = vm_factory(memory="256M")
    machine.load_linux(kernel, cmdline="console=ttyS0 panic=-1")
    machine.start(timeout=1800)
    machine.console.expect("VFS: Unable to mount root fs", timeout=1800)
