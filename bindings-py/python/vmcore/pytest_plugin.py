"""pytest plugin for vmcore (registered through the ``pytest11`` entry point).

Fixtures:

``vm``
    A fresh :class:`vmcore.Vm`, closed after the test. Configure it with a marker:
    ``@pytest.mark.vm(memory="128M", vcpus=2)``. When the test fails, the VM's console tail
    and outcome are attached to the report. Skips (loudly) where ``/dev/kvm`` is absent.

``vm_factory``
    Call it to make more VMs (same keyword arguments as :class:`vmcore.Vm`); all are closed
    after the test, and their consoles reported on failure.

``linux_vm``
    A :class:`vmcore.Vm` that has booted a Linux kernel with its initrd to the point where the
    console shows the ready pattern (``vmcore: ready``, which the init of the initramfs from
    ``scripts/linux-guest`` prints once the modules the command line names are loaded, right
    before its shell starts: nothing typed earlier is lost, but until then the kernel may be
    busy for minutes where its code is emulated). Configure it with ``@pytest.mark.linux(vcpus=2,
    memory="256M", cmdline="console=ttyS0", ready=..., boot_timeout=1800)``; ``ready=None``
    returns as soon as the kernel starts; ``setup=callable`` is called with the VM before the
    kernel is loaded, to add devices or hooks (virtio devices must exist before boot). The
    kernel and initrd come from the environment
    (``VMCORE_LINUX_KERNEL``, ``VMCORE_LINUX_INITRD``), the ini options ``vmcore_linux_kernel``
    and ``vmcore_linux_initrd``, or ``target/linux/vmlinuz`` and
    ``target/linux/initramfs.cpio`` under the rootdir; the test is skipped, saying where it
    looked, when they are not there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Generator, Iterator, List, Optional

import pytest

import vmcore

KVM_DEVICE = "/dev/kvm"


def kvm_available() -> bool:
    """Whether this process can open ``/dev/kvm``."""
    return os.access(KVM_DEVICE, os.R_OK | os.W_OK)


LINUX_READY = "vmcore: ready"
"""What the init of the initramfs built by ``scripts/linux-guest`` prints when its shell is about
to start: after the modules named by ``vmcore.modules=`` are loaded (and the root is switched to
a disk where ``vmcore.root=`` says so)."""


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("vmcore_linux_kernel", "Linux kernel for the linux_vm fixture (default target/linux/vmlinuz)", default="")
    parser.addini(
        "vmcore_linux_initrd", "initrd for the linux_vm fixture (default target/linux/initramfs.cpio)", default=""
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vm(**kwargs): arguments for the vm fixture's vmcore.Vm")
    config.addinivalue_line(
        "markers", "linux(**kwargs): vcpus, memory, cmdline, ready, boot_timeout, setup for the linux_vm fixture"
    )
    config.addinivalue_line("markers", "slow: a test that boots something big (deselect with -m 'not slow')")


def pytest_report_header(config: pytest.Config) -> str:
    if kvm_available():
        return f"vmcore {vmcore.__version__}: {KVM_DEVICE} is usable, VM tests will run"
    return f"vmcore {vmcore.__version__}: WARNING {KVM_DEVICE} is absent or not accessible: every VM test will be SKIPPED"


def _require_kvm() -> None:
    if not kvm_available():
        pytest.skip(f"{KVM_DEVICE} is absent or not accessible: vmcore needs KVM to run guests")


@pytest.fixture
def vm_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., vmcore.Vm]]:
    _require_kvm()
    made: List[vmcore.Vm] = []

    def make(**kwargs: Any) -> vmcore.Vm:
        machine = vmcore.Vm(**kwargs)
        made.append(machine)
        return machine

    request.node._vmcore_vms = made
    yield make
    for machine in made:
        machine.close()


@pytest.fixture
def vm(request: pytest.FixtureRequest, vm_factory: Callable[..., vmcore.Vm]) -> vmcore.Vm:
    marker = request.node.get_closest_marker("vm")
    return vm_factory(**(marker.kwargs if marker else {}))


def linux_guest_path(config: pytest.Config, what: str) -> Path:
    """Where the ``linux_vm`` fixture finds its kernel (``what="kernel"``) or initrd."""
    default = {"kernel": "target/linux/vmlinuz", "initrd": "target/linux/initramfs.cpio"}[what]
    chosen = os.environ.get(f"VMCORE_LINUX_{what.upper()}") or str(config.getini(f"vmcore_linux_{what}"))
    path = Path(chosen or default)
    return path if path.is_absolute() else Path(config.rootpath) / path


@pytest.fixture
def linux_vm(request: pytest.FixtureRequest, vm_factory: Callable[..., vmcore.Vm]) -> vmcore.Vm:
    marker = request.node.get_closest_marker("linux")
    options = dict(marker.kwargs) if marker else {}
    unknown = set(options) - {"vcpus", "memory", "cmdline", "ready", "boot_timeout", "setup"}
    if unknown:
        raise pytest.UsageError(f"unknown linux marker arguments: {sorted(unknown)}")
    kernel = linux_guest_path(request.config, "kernel")
    initrd = linux_guest_path(request.config, "initrd")
    for what, path in (("kernel", kernel), ("initrd", initrd)):
        if not path.is_file():
            pytest.skip(
                f"no Linux {what} at {path}: run scripts/linux-guest (part of scripts/setup) or set "
                f"VMCORE_LINUX_{what.upper()}"
            )
    machine = vm_factory(memory=options.get("memory", "256M"), vcpus=options.get("vcpus", 1))
    setup: Optional[Callable[[vmcore.Vm], Any]] = options.get("setup")
    if setup is not None:
        setup(machine)
    machine.load_linux(kernel, initrd, options.get("cmdline", "console=ttyS0"))
    machine.start()
    ready: Optional[str] = options.get("ready", LINUX_READY)
    if ready is not None:
        machine.console.expect(ready, timeout=float(options.get("boot_timeout", 1800)))
    return machine


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when != "call" or not report.failed:
        return report
    for index, machine in enumerate(getattr(item, "_vmcore_vms", [])):
        if machine.closed:
            continue
        state = "running" if machine.is_running else str(machine.outcome or "not run")
        report.sections.append(
            (f"vmcore VM {index} console tail ({state})", machine.console.tail() or "(no output)")
        )
    return report
