"""vmcore: a hypervisor as a library.

Boot a small guest or a kernel on KVM, watch its console, read its registers and memory::

    import vmcore

    with vmcore.Vm(memory="64M") as vm:
        vm.load_elf("kernel.elf")
        outcome = vm.run(timeout=5)
        assert outcome.reason == "halted"
        vm.console.expect(r"hello")

Log records from the core go to the ``vmcore`` loggers of Python's ``logging``. vmcore caches
their levels: after changing them, call :func:`refresh_logging`.
"""

from ._errors import (
    ConfigError,
    ConsoleClosed,
    ConsoleTimeout,
    ExpectError,
    HookError,
    GuestMemoryError,
    KvmError,
    KvmUnavailableError,
    LoadError,
    VmError,
    VmIOError,
    VmStateError,
)
from ._host import HostInfo, host_info
from ._native import __version__, parse_memory_size, refresh_logging
from ._vm import (
    REGISTER_NAMES,
    Console,
    ConsoleChunk,
    ConsoleMatch,
    HookEvent,
    LinuxKernel,
    LinuxProtocol,
    Mode,
    Net,
    Outcome,
    PacketCallback,
    Registers,
    Vcpu,
    VirtioDevice,
    Vm,
    VmState,
)

__all__ = [
    "Vm",
    "Vcpu",
    "Registers",
    "Console",
    "ConsoleChunk",
    "ConsoleMatch",
    "Outcome",
    "HookEvent",
    "VirtioDevice",
    "Net",
    "PacketCallback",
    "HookError",
    "Mode",
    "VmState",
    "LinuxKernel",
    "LinuxProtocol",
    "REGISTER_NAMES",
    "parse_memory_size",
    "refresh_logging",
    "host_info",
    "HostInfo",
    "VmError",
    "KvmUnavailableError",
    "KvmError",
    "ConfigError",
    "LoadError",
    "GuestMemoryError",
    "VmStateError",
    "ExpectError",
    "ConsoleTimeout",
    "ConsoleClosed",
    "VmIOError",
    "__version__",
]
