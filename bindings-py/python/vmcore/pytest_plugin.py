"""pytest plugin for vmcore (registered through the ``pytest11`` entry point).

Fixtures:

``vm``
    A fresh :class:`vmcore.Vm`, closed after the test. Configure it with a marker:
    ``@pytest.mark.vm(memory="128M", vcpus=2)``. When the test fails, the VM's console tail
    and outcome are attached to the report. Skips (loudly) where ``/dev/kvm`` is absent.

``vm_factory``
    Call it to make more VMs (same keyword arguments as :class:`vmcore.Vm`); all are closed
    after the test, and their consoles reported on failure.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Generator, Iterator, List

import pytest

import vmcore

KVM_DEVICE = "/dev/kvm"


def kvm_available() -> bool:
    """Whether this process can open ``/dev/kvm``."""
    return os.access(KVM_DEVICE, os.R_OK | os.W_OK)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vm(**kwargs): arguments for the vm fixture's vmcore.Vm")
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
