"""The Linux guest that scripts/linux-guest builds, booted under QEMU (TCG) by scripts/qemu_linux.py:
the init's marker, a shell on the console that runs commands, and power-off."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GUEST = REPO / "target" / "linux"
SPEC = importlib.util.spec_from_file_location("qemu_linux", REPO / "scripts" / "qemu_linux.py")
assert SPEC is not None and SPEC.loader is not None
qemu_linux = importlib.util.module_from_spec(SPEC)
sys.modules["qemu_linux"] = qemu_linux
SPEC.loader.exec_module(qemu_linux)

pytestmark = [
    pytest.mark.skipif(not (GUEST / "initramfs.cpio").exists(), reason="the Linux guest is not built "
                       "(scripts/linux-guest)"),
    pytest.mark.skipif(shutil.which(qemu_linux.QEMU) is None, reason=f"{qemu_linux.QEMU} is not installed "
                       "(Debian package qemu-system-x86; scripts/qemu-linux installs it)"),
]


def test_linux_boots_to_a_shell_under_qemu_tcg():
    commands = ["uname -r", "grep -c ^processor /proc/cpuinfo", "modprobe virtio_blk && lsmod"]
    result = qemu_linux.boot(accel="tcg", smp=2, memory="256M", commands=commands, timeout=120)
    assert result.console.count(qemu_linux.MARKER + "\n") == 1
    assert result.outputs[0] == (GUEST / "version").read_text().strip()
    assert result.outputs[1] == "2"
    assert "virtio_blk" in result.outputs[2] and "virtio_ring" in result.outputs[2]
    assert result.exit_status == 0  # poweroff -f ended QEMU
    assert 0 < result.seconds_to_marker <= result.seconds_total


def test_a_missing_marker_is_reported_with_the_console_tail():
    with pytest.raises(qemu_linux.GuestTimeout, match=r"(?s)exited.*before the marker line.*console tail.*Kernel panic"):
        # rdinit names a program that does not exist: the kernel panics, and panic=-1 ends QEMU.
        qemu_linux.boot(append="rdinit=/nonexistent", timeout=60)
