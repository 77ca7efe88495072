"""The vmcore command: run and info, exit statuses, config files, a pty console."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
import termios
import tty
from pathlib import Path

import pytest

VMCORE = [sys.executable, "-m", "vmcore.cli"]


@pytest.fixture(autouse=True)
def needs_kvm():
    if not os.access("/dev/kvm", os.W_OK):
        pytest.skip("/dev/kvm is absent: the vmcore command needs KVM")


def vmcore(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(VMCORE + list(args), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "vmcore"
    assert script.exists(), "pyproject's [project.scripts] installs `vmcore`"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "run" in out.stdout and "info" in out.stdout


def test_info_describes_the_host():
    out = vmcore("info")
    assert out.returncode == 0, out.stderr
    assert re.search(r"^KVM: \w+, API version 12", out.stdout, re.M)
    assert "sync_regs" in out.stdout and "32-bit paging" in out.stdout


def test_run_an_elf_kernel_to_its_halt(guests):
    out = vmcore("run", "--kernel", str(guests.path("hello-long.elf")), "--memory", "32M")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "hello from elf64\n"
    assert "vmcore: halted" in out.stderr


def test_profile_names_where_the_guest_spent_its_time(guests, tmp_path):
    symbols = tmp_path / "System.map"
    symbols.write_text("0000000000000000 D data\n0000000000100000 T spin_guest\n")
    out = vmcore("run", "--kernel", str(guests.path("spin.bin")), "--flat", "long", "--timeout", "0.5", "--profile", str(symbols))
    assert out.returncode == 124, out.stderr
    assert re.search(r"vmcore: \d+ RIP samples", out.stderr), out.stderr
    assert re.search(r"(?m)^100\.00% +\d+ spin_guest$", out.stderr), out.stderr


def test_exit_statuses_follow_qemu_and_timeout(guests):
    out = vmcore("run", "--kernel", str(guests.path("debug-exit.bin")), "--flat", "long")
    assert out.returncode == (0x31 << 1) | 1, out.stderr
    out = vmcore("run", "--kernel", str(guests.path("spin.bin")), "--flat", "long", "--timeout", "0.5")
    assert out.returncode == 124 and "timeout" in out.stderr
    out = vmcore("run", "--kernel", str(guests.path("triple-fault.bin")), "--flat", "long")
    assert out.returncode == 2
    out = vmcore("run", "--kernel", str(guests.path("mb-power.elf")), "--append", "poweroff")
    assert out.returncode == 0 and "vmcore: poweroff" in out.stderr, out.stderr
    out = vmcore("run", "--kernel", str(guests.path("mb-power.elf")), "--append", "kbd-reset")
    assert out.returncode == 4 and "vmcore: reboot" in out.stderr, out.stderr


def test_bad_input_gives_meaningful_statuses(guests, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a kernel\n")
    out = vmcore("run", "--kernel", str(text))
    assert out.returncode == 65 and "neither a multiboot kernel" in out.stderr
    out = vmcore("run", "--kernel", str(guests.path("hello-long.elf")), "--append", "quiet")
    assert out.returncode == 65 and "no multiboot header" in out.stderr
    out = vmcore("run")
    assert out.returncode == 64 and "no kernel" in out.stderr
    out = vmcore("run", "--kernel", str(guests.path("hello-long.elf")), "--memory", "lots")
    assert out.returncode == 64


def test_config_file(guests, tmp_path):
    config = tmp_path / "vm.toml"
    kernel = tmp_path / "k.bin"
    kernel.write_bytes(guests.bytes("debug-exit.bin"))
    config.write_text('kernel = "k.bin"\nflat = "long"\nmemory = "16M"\ncpus = 2\n')
    out = vmcore("run", "-c", str(config))
    assert out.returncode == 0x63, out.stderr
    config.write_text('kernel = "k.bin"\ncolour = "blue"\n')
    out = vmcore("run", "-c", str(config))
    assert out.returncode == 64 and "unknown keys ['colour']" in out.stderr


def test_disks_are_attached_and_bad_disk_specs_refused(guests, tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    kernel = ["run", "--kernel", str(guests.path("debug-exit.bin")), "--flat", "long"]
    out = vmcore(*kernel, "--disk", str(image), "--disk", f"{image},readonly")
    assert out.returncode == 0x63, out.stderr
    out = vmcore(*kernel, "--disk", f"{image},sometimes")
    assert out.returncode == 64 and "only ',readonly' may follow" in out.stderr
    out = vmcore(*kernel, "--disk", str(tmp_path / "missing.img"))
    assert out.returncode != 0 and "missing.img" in out.stderr


def read_until(fd: int, pattern: bytes, timeout: float = 20) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while pattern not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {pattern!r} on the pty; got {seen!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            seen += os.read(fd, 4096)
    return seen


def test_pty_console_can_be_attached_to_and_typed_into(guests):
    proc = subprocess.Popen(
        VMCORE + ["run", "--kernel", str(guests.path("echo.bin")), "--flat", "long", "--console", "pty", "--timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},
        # A shell's background job (a CI runner's, say) starts with SIGINT ignored, and Python
        # then installs no ^C handler: give the CLI the disposition an interactive user's has.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        line = proc.stderr.readline()
        match = re.search(r"console on (/dev/pts/\d+) \(attach with: cu -l", line)
        assert match, line
        fd = os.open(match.group(1), os.O_RDWR | os.O_NOCTTY)
        try:
            # TCSANOW: the default TCSAFLUSH would discard what the guest printed before we got here.
            tty.setraw(fd, termios.TCSANOW)
            read_until(fd, b"ready\n")
            os.write(fd, b"typed into the pty\n")
            assert b"typed into the pty\n" in read_until(fd, b"typed into the pty\n")
        finally:
            os.close(fd)
        proc.send_signal(signal.SIGINT)
        try:
            status = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            # Hung: SIGABRT makes faulthandler print every thread's stack for the report.
            proc.send_signal(signal.SIGABRT)
            _, stderr = proc.communicate(timeout=20)
            pytest.fail(f"vmcore run did not end within 20 s of SIGINT; its stacks:\n{stderr}")
        assert status == 130, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
