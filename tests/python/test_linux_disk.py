"""Linux with its root file system on a vmcore virtio-blk disk: the initramfs loads virtio_mmio and
virtio_blk (the disk is found through the DSDT), switches root to /dev/vda, the guest writes a
file and powers off; the file is read back from the image on the host with debugfs, then by the
guest after a second boot. Slow here: each boot takes minutes on a host that emulates guest
kernel code."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import vmcore
from vmcore.pytest_plugin import LINUX_READY, linux_guest_path

DISK_ROOT = "vmcore: disk root reached"
BOOT_TIMEOUT = 1500.0


@pytest.fixture
def disk(pytestconfig: pytest.Config, tmp_path: Path) -> Path:
    image = Path(pytestconfig.rootpath) / "target" / "linux" / "rootfs.ext4"
    if not image.is_file():
        pytest.skip(f"no root disk at {image}: run scripts/disk-image (part of scripts/setup)")
    if shutil.which("debugfs") is None:
        pytest.skip("debugfs (e2fsprogs) is missing")
    copy = tmp_path / "root.ext4"
    shutil.copyfile(image, copy)
    return copy


def boot_from(vm_factory, pytestconfig: pytest.Config, disk: Path) -> vmcore.Vm:
    kernel, initrd = (linux_guest_path(pytestconfig, what) for what in ("kernel", "initrd"))
    for path in (kernel, initrd):
        if not path.is_file():
            pytest.skip(f"no {path}: run scripts/linux-guest")
    machine = vm_factory(memory="256M")
    machine.add_disk(disk, serial="vmcore-root")
    machine.load_linux(kernel, initrd, "console=ttyS0 vmcore.root=/dev/vda")
    machine.start(timeout=2 * BOOT_TIMEOUT)
    machine.console.expect(LINUX_READY, timeout=BOOT_TIMEOUT)
    machine.console.expect(DISK_ROOT + r" \(/dev/vda\)", timeout=BOOT_TIMEOUT)
    return machine


def debugfs_cat(image: Path, path: str) -> str:
    out = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, text=True, check=True)
    return out.stdout


@pytest.mark.slow
def test_linux_writes_its_virtio_root_disk_and_reads_it_back_after_a_reboot(vm_factory, pytestconfig, disk):
    first = boot_from(vm_factory, pytestconfig, disk)
    console = first.console
    console.send("cat /sys/block/vda/serial; echo; echo written-by-vmcore-guest > /hello.txt; sync; poweroff -f\n")
    console.expect(r"vmcore-root", timeout=300)
    outcome = first.wait(timeout=600)
    assert outcome is not None and outcome.reason == "poweroff", outcome
    first.close()
    assert debugfs_cat(disk, "/hello.txt") == "written-by-vmcore-guest\n"

    second = boot_from(vm_factory, pytestconfig, disk)
    second.console.send("cat /hello.txt\n")
    second.console.expect(r"(?m)^written-by-vmcore-guest\r?$", timeout=300)
    second.console.send("poweroff -f\n")
    outcome = second.wait(timeout=600)
    assert outcome is not None and outcome.reason == "poweroff", outcome
