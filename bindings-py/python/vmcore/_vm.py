"""The Python face of a vmcore virtual machine."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Literal, Optional, Tuple, Union

from . import _native

Mode = Literal["real", "protected", "long"]
"""CPU mode a flat binary is entered in."""

REGISTER_NAMES: Tuple[str, ...] = tuple(_native.REGISTER_NAMES)
"""Every register name :class:`Registers` understands."""

_REASONS = (
    "halted",
    "shutdown",
    "debug_exit",
    "timeout",
    "stopped",
    "emulation_failure",
    "internal_error",
)


@dataclass(frozen=True)
class Outcome:
    """How a run ended.

    ``reason`` is one of ``"halted"`` (every vCPU halted with interrupts off), ``"shutdown"``
    (triple fault), ``"debug_exit"`` (the guest wrote ``code`` to port 0xf4), ``"timeout"``,
    ``"stopped"``, ``"emulation_failure"`` (``rip`` and ``instruction`` say where) and
    ``"internal_error"`` (``detail`` says what).
    """

    reason: str
    code: Optional[int] = None
    vcpu: Optional[int] = None
    rip: Optional[int] = None
    instruction: bytes = b""
    detail: str = ""
    summary: str = field(default="", compare=False)

    @property
    def qemu_exit_status(self) -> Optional[int]:
        """The status QEMU's isa-debug-exit would exit with: ``(code << 1) | 1``."""
        return None if self.code is None else (self.code << 1) | 1

    def __str__(self) -> str:
        return self.summary or self.reason

    @classmethod
    def _from_native(cls, d: Dict[str, Any]) -> "Outcome":
        return cls(**d)


@dataclass(frozen=True)
class ConsoleMatch:
    """What :meth:`Console.expect` found. Offsets index the whole console output."""

    text: str
    start: int
    end: int
    groups_: Tuple[Optional[str], ...]
    names: Tuple[Optional[str], ...]

    def group(self, key: Union[int, str] = 0) -> Optional[str]:
        """A capture group by index (0 is the whole match) or by name, like ``re.Match.group``."""
        if isinstance(key, str):
            try:
                key = self.names.index(key)
            except ValueError:
                raise IndexError(f"no group named {key!r}") from None
        return self.groups_[key]

    def groups(self) -> Tuple[Optional[str], ...]:
        """All capture groups except the whole match, like ``re.Match.groups``."""
        return self.groups_[1:]

    def groupdict(self) -> Dict[str, Optional[str]]:
        """Named groups by name, like ``re.Match.groupdict``."""
        return {n: g for n, g in zip(self.names, self.groups_) if n is not None}

    def __getitem__(self, key: Union[int, str]) -> Optional[str]:
        return self.group(key)


class Console:
    """The guest's COM1 serial console: everything it printed, and a way to type into it."""

    def __init__(self, native: "_native.NativeVm") -> None:
        self._native = native

    @property
    def output(self) -> str:
        """Everything the guest has printed so far (UTF-8, invalid bytes replaced)."""
        return self._native.console_output()

    @property
    def output_bytes(self) -> bytes:
        """Everything the guest has printed so far, as raw bytes."""
        return self._native.console_output_bytes()

    def tail(self) -> str:
        """The last ~2000 characters of output."""
        return self._native.console_tail()

    def expect(self, pattern: Union[str, "re.Pattern[str]"], timeout: float = 10.0) -> ConsoleMatch:
        """Waits up to ``timeout`` seconds for ``pattern`` in the output after the previous match.

        Like pexpect, each match consumes the output up to its end, so successive calls walk
        forward. The pattern uses Rust ``regex`` syntax (Python's minus look-around and
        backreferences). Raises :class:`~vmcore.ConsoleTimeout` (a ``TimeoutError``) or, if the
        VM ends first, :class:`~vmcore.ConsoleClosed`; both messages end with the console tail.
        """
        if isinstance(pattern, re.Pattern):
            pattern = pattern.pattern
        text, start, end, groups, names = self._native.console_expect(pattern, float(timeout))
        return ConsoleMatch(text, start, end, tuple(groups), tuple(names))

    def send(self, data: Union[str, bytes]) -> None:
        """Types ``data`` into the guest's serial receiver (str is sent as UTF-8). Nothing is
        dropped: what the 16-byte FIFO cannot take waits until the guest reads."""
        if isinstance(data, str):
            data = data.encode()
        self._native.console_send(bytes(data))

    def __repr__(self) -> str:
        return f"<vmcore.Console {len(self.output_bytes)} bytes>"


class Registers:
    """A vCPU's registers by name: ``regs.rip``, ``regs["cr0"]``, ``regs.rax = 5``.

    Each read fetches fresh values from KVM; each write goes straight to the vCPU. The vCPU
    must not be running (stop the VM, or wait for it to end). :data:`REGISTER_NAMES` lists the
    names; ``cs``… are selectors, ``*_base`` hidden segment bases.
    """

    __slots__ = ("_native", "_index")

    def __init__(self, native: "_native.NativeVm", index: int) -> None:
        object.__setattr__(self, "_native", native)
        object.__setattr__(self, "_index", index)

    def as_dict(self) -> Dict[str, int]:
        """Every register at once (one KVM round trip)."""
        return dict(self._native.registers(self._index))

    def __getitem__(self, name: str) -> int:
        regs = self.as_dict()
        if name not in regs:
            raise KeyError(f"unknown register {name!r}; known: {', '.join(REGISTER_NAMES)}")
        return regs[name]

    def __setitem__(self, name: str, value: int) -> None:
        self._native.set_register(self._index, name, int(value))

    def __getattr__(self, name: str) -> int:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(e.args[0]) from None

    def __setattr__(self, name: str, value: int) -> None:
        self[name] = value

    def __dir__(self) -> Iterator[str]:
        return iter(sorted(set(REGISTER_NAMES) | {"as_dict"}))

    def __iter__(self) -> Iterator[str]:
        return iter(REGISTER_NAMES)

    def __repr__(self) -> str:
        try:
            regs = self.as_dict()
        except Exception as e:  # a running vCPU has no readable registers
            return f"<vmcore.Registers vcpu={self._index} ({e})>"
        shown = ", ".join(f"{k}={regs[k]:#x}" for k in ("rip", "rsp", "rax", "rflags", "cr0", "cr3"))
        return f"<vmcore.Registers vcpu={self._index} {shown}>"


class Vcpu:
    """One virtual CPU of a :class:`Vm`."""

    def __init__(self, native: "_native.NativeVm", index: int) -> None:
        self._native = native
        self.index = index
        self._regs = Registers(native, index)

    @property
    def regs(self) -> Registers:
        """Read and write registers by name: ``vcpu.regs.rip``, ``vcpu.regs.rax = 1``."""
        return self._regs

    def __repr__(self) -> str:
        return f"<vmcore.Vcpu {self.index}>"


class Vm:
    """A KVM virtual machine.

    ::

        with vmcore.Vm(memory="64M") as vm:
            vm.load_flat(code, address=0x100000, mode="long")
            outcome = vm.run(timeout=5)
            vm.console.expect(r"hello")

    ``memory`` is bytes or a size such as ``"64M"`` or ``"1G"``; ``vcpus`` the number of
    virtual CPUs; ``tee`` copies console output as it arrives to ``"stdout"``, ``"stderr"``
    or a file path. Closing the VM (``close()``, ``with``, or garbage collection) stops it and
    frees its threads, file descriptors and memory.
    """

    def __init__(
        self,
        memory: Union[int, str] = "64M",
        vcpus: int = 1,
        *,
        tee: Union[str, "os.PathLike[str]", None] = None,
    ) -> None:
        self._native = _native.NativeVm(memory, vcpus, None if tee is None else os.fspath(tee))
        self._console = Console(self._native)
        self._vcpus = tuple(Vcpu(self._native, i) for i in range(self._native.vcpu_count))

    # -- loading -----------------------------------------------------------------------------

    def load_flat(self, code: bytes, address: int = 0x100000, mode: Mode = "long") -> int:
        """Copies a flat binary to ``address`` and points vCPU 0 at it; returns the entry address.

        ``"real"``: every segment is based at ``address`` (16-byte aligned; code assembled at
        origin 0), SP=0. ``"protected"``: flat 32-bit segments, paging off. ``"long"``: 64-bit
        on an identity map of the low 4 GiB. Protected and long mode use 0x500-0x8000 for the
        GDT, page tables and the initial stack (ESP/RSP = 0x8000).
        """
        return self._native.load_flat(bytes(code), int(address), mode)[1]

    def load_elf(self, path: Union[str, "os.PathLike[str]"]) -> int:
        """Loads an ELF32 (entered in protected mode) or ELF64 (long mode) executable by its
        program headers' physical addresses; returns the entry address. Raises
        :class:`~vmcore.LoadError` saying what is wrong with a malformed image."""
        return self._native.load_elf(os.fspath(path))[1]

    # -- running -----------------------------------------------------------------------------

    def run(self, timeout: Optional[float] = None) -> Outcome:
        """Runs until the guest ends the run or ``timeout`` seconds pass (outcome ``"timeout"``).

        The GIL is released while the guest runs. Ctrl-C stops the VM and raises
        ``KeyboardInterrupt``.
        """
        return Outcome._from_native(self._native.run(timeout))

    def start(self, timeout: Optional[float] = None) -> None:
        """Starts the guest in the background; with ``timeout`` the run ends by itself then."""
        self._native.start(timeout)

    def wait(self, timeout: Optional[float] = None) -> Optional[Outcome]:
        """Waits up to ``timeout`` seconds (forever with None) for the run to end; returns its
        outcome, or None if it is still running."""
        d = self._native.wait(timeout)
        return None if d is None else Outcome._from_native(d)

    def stop(self) -> Optional[Outcome]:
        """Stops a running guest (outcome ``"stopped"``) and returns the last run's outcome,
        or None if the VM never ran. Stopping a VM that has ended is harmless."""
        d = self._native.stop()
        return None if d is None else Outcome._from_native(d)

    def close(self) -> None:
        """Stops the VM and frees its threads, file descriptors and guest memory. Idempotent."""
        self._native.close()

    @property
    def closed(self) -> bool:
        return self._native.closed

    @property
    def is_running(self) -> bool:
        return self._native.is_running

    @property
    def outcome(self) -> Optional[Outcome]:
        """The outcome of the last run, if one has ended."""
        d = self._native.outcome()
        return None if d is None else Outcome._from_native(d)

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- state -------------------------------------------------------------------------------

    @property
    def console(self) -> Console:
        """The COM1 serial console."""
        return self._console

    @property
    def vcpus(self) -> Tuple[Vcpu, ...]:
        """The virtual CPUs, indexed by APIC ID."""
        return self._vcpus

    @property
    def memory_size(self) -> int:
        """Guest RAM in bytes."""
        return self._native.memory_size

    def read_phys(self, address: int, length: int) -> bytes:
        """Reads guest-physical memory. Raises :class:`~vmcore.GuestMemoryError` outside RAM."""
        return self._native.read_phys(address, length)

    def write_phys(self, address: int, data: bytes) -> None:
        """Writes guest-physical memory. Raises :class:`~vmcore.GuestMemoryError` outside RAM."""
        self._native.write_phys(address, bytes(data))

    def read_virt(self, vcpu: int, address: int, length: int) -> bytes:
        """Reads guest-virtual memory through vCPU ``vcpu``'s page tables (no paging, 32-bit,
        PAE, 4- and 5-level). The vCPU must not be running."""
        return self._native.read_virt(vcpu, address, length)

    def write_virt(self, vcpu: int, address: int, data: bytes) -> None:
        """Writes guest-virtual memory through vCPU ``vcpu``'s page tables; nothing is written
        unless every page is mapped."""
        self._native.write_virt(vcpu, address, bytes(data))

    def translate(self, vcpu: int, address: int) -> int:
        """The guest-physical address vCPU ``vcpu`` would reach at guest-virtual ``address``."""
        return self._native.translate(vcpu, address)

    def stats(self) -> Dict[str, Any]:
        """Exit counters: ``exits`` by reason, ``exits_total``, and unhandled port and MMIO
        accesses by port or address (unhandled reads return all-ones, writes are dropped)."""
        return self._native.stats()

    def __repr__(self) -> str:
        if self.closed:
            return "<vmcore.Vm closed>"
        state = "running" if self.is_running else (str(self.outcome) if self.outcome else "ready")
        return f"<vmcore.Vm memory={self.memory_size >> 20}M vcpus={len(self._vcpus)} {state}>"
