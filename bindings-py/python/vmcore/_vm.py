"""The Python face of a vmcore virtual machine."""

from __future__ import annotations

import atexit
import os
import re
import weakref
from dataclasses import dataclass, field
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Literal,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
)

if TYPE_CHECKING:
    from typing_extensions import TypeAlias

from . import _native
from ._native import NativeVm

Mode: TypeAlias = Literal["real", "protected", "long"]
VmState: TypeAlias = Literal["created", "loaded", "running", "paused", "ended", "closed"]
"""CPU mode a flat binary is entered in."""

REGISTER_NAMES: Tuple[str, ...] = tuple(_native.REGISTER_NAMES)
"""Every register name :class:`Registers` understands."""

Hook = TypeVar("Hook", bound=Callable[..., Any])


@dataclass(frozen=True)
class Outcome:
    """How a run ended.

    ``reason`` is one of ``"halted"`` (every vCPU halted with interrupts off), ``"shutdown"``
    (triple fault), ``"debug_exit"`` (the guest wrote ``code`` to port 0xf4), ``"timeout"``,
    ``"stopped"``, ``"emulation_failure"`` (``rip`` and ``instruction`` say where),
    ``"internal_error"`` (``detail`` says what), ``"hook_stop"`` (a hook called
    ``ev.stop(result)``: ``result`` is that object, ``code`` it when it is an int) and
    ``"hook_error"`` (a hook raised; ``run()`` and ``wait()`` raise that exception),
    ``"reboot"`` (the guest reset the machine: keyboard controller, port 0xcf9 or the ACPI reset
    register; ``detail`` says which), ``"poweroff"`` (the guest entered ACPI S5) and
    ``"paused"`` (:meth:`Vm.pause` was called). ``"timeout"``, ``"stopped"`` and ``"paused"``
    runs continue the same guest on the next ``run()``/``start()`` (or ``resume()``).
    """

    reason: str
    code: Optional[int] = None
    vcpu: Optional[int] = None
    rip: Optional[int] = None
    instruction: bytes = b""
    detail: str = ""
    result: Any = field(default=None, compare=False)
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


LinuxProtocol = Literal["auto", "linux64", "pvh"]


@dataclass(frozen=True)
class LinuxKernel:
    """What :meth:`Vm.load_linux` put in guest memory."""

    format: str
    """``"bzImage"`` or ``"vmlinux"``."""
    version: Optional[str]
    """The version string a bzImage header carries."""
    compression: Optional[str]
    """The bzImage payload's compression when it was decompressed on the host."""
    protocol: str
    """How the kernel is entered: ``"pvh"`` or ``"linux64"``."""
    entry: int
    kernel: Tuple[int, int]
    """Guest-physical start and end of the kernel."""
    initrd: Optional[Tuple[int, int]]
    """Guest-physical address and size of the initrd."""
    cmdline: str
    """The command line the kernel gets, host adaptations included."""


class ConsoleChunk(NamedTuple):
    """Console output read from ``offset`` on (see :meth:`Console.read`)."""

    offset: int
    data: bytes


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


class HookEvent:
    """What a hook is called with.

    Always: ``kind`` (``"io"``, ``"mmio"``, ``"msr"``, ``"cpuid"``, ``"cr"``, ``"breakpoint"``,
    ``"step"``, ``"hlt"``, ``"shutdown"``, ``"exit"``), ``vcpu``, ``rip``, ``vm``, ``regs`` (the
    vCPU's registers, readable and writable from the hook). Per kind: ``port``/``size``/
    ``is_write`` (io), ``address``/``size``/``is_write`` (mmio), ``index``/``is_write`` (msr),
    ``leaf``/``subleaf`` (cpuid), ``cr``/``old``/``is_write`` (cr), ``address`` (breakpoint),
    ``reason`` (exit), ``instruction`` (the instruction text, where precise mode decoded it).

    ``value`` is the value written (writes) or the value supplied (reads, None until a hook
    supplies one); assign it to rewrite a write or supply a read. ``veto()`` drops a write;
    ``stop(result)`` ends the run with outcome ``"hook_stop"``.
    """

    __slots__ = ("_native", "_vm")

    def __init__(self, native: _native.HookEvent, vm: "Vm") -> None:
        self._native = native
        self._vm = vm

    @property
    def vm(self) -> "Vm":
        return self._vm

    @property
    def regs(self) -> "Registers":
        return self._vm.vcpus[self._native.vcpu].regs

    @property
    def value(self) -> Optional[int]:
        return self._native.value

    @value.setter
    def value(self, value: Optional[int]) -> None:
        self._native.value = None if value is None else int(value) & 0xFFFF_FFFF_FFFF_FFFF

    def veto(self) -> None:
        """Drops the write: it never reaches the device, MSR or control register."""
        self._native.veto()

    def stop(self, result: Any = None) -> None:
        """Ends the run after this event; ``result`` becomes ``outcome.result``."""
        self._native.stop(result)

    def read_virt(self, address: int, length: int) -> bytes:
        """Reads guest-virtual memory through this vCPU's page tables."""
        return self._vm.read_virt(self._native.vcpu, address, length)

    def read_phys(self, address: int, length: int) -> bytes:
        return self._vm.read_phys(address, length)

    def write_phys(self, address: int, data: bytes) -> None:
        self._vm.write_phys(address, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._native, name)

    def __repr__(self) -> str:
        return repr(self._native)


ModuleSpec = Union[str, "os.PathLike[str]", Tuple[Union[str, "os.PathLike[str]"], str]]


def _module_pairs(modules: Sequence[ModuleSpec]) -> List[Tuple[str, str]]:
    """Multiboot modules as (path, arguments) pairs: a bare path has no arguments."""
    return [(os.fspath(m[0]), m[1]) if isinstance(m, tuple) else (os.fspath(m), "") for m in modules]


def _byte_string(data: Any, what: str) -> bytes:
    """``data`` as bytes, from anything with the buffer protocol (bytes, bytearray, memoryview,
    array). ``bytes(5)`` would be five zero bytes, so an int, like any other type, is refused."""
    try:
        return bytes(memoryview(data))
    except TypeError:
        raise TypeError(f"{what} must be bytes-like (bytes, bytearray or memoryview), not {type(data).__name__}") from None


def _supplied_value(answer: Any) -> int:
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise TypeError(f"a read hook returns an int (the value) or None, not {answer!r}")
    return answer & 0xFFFF_FFFF_FFFF_FFFF


def _cpuid_answer(answer: Any) -> Tuple[int, int, int, int]:
    try:
        eax, ebx, ecx, edx = (int(r) & 0xFFFF_FFFF for r in answer)
    except (TypeError, ValueError):
        raise TypeError(f"a CPUID hook returns (eax, ebx, ecx, edx) or None, not {answer!r}") from None
    return eax, ebx, ecx, edx


class Console:
    """A guest console: everything the guest printed there, and a way to type into it. ``vm.console``
    is COM1; :meth:`Vm.add_console` adds virtio consoles (Linux's ``/dev/hvc0``)."""

    def __init__(self, native: NativeVm, port: Optional[int] = None) -> None:
        self._native = native
        self._port = port

    @property
    def output(self) -> str:
        """Everything the guest has printed so far (the newest ``console_limit`` bytes of it;
        UTF-8, invalid bytes replaced)."""
        return self._native.console_output(self._port)

    @property
    def output_bytes(self) -> bytes:
        """Everything the guest has printed so far (the newest ``console_limit`` bytes of it), as
        raw bytes."""
        return self._native.console_output_bytes(self._port)

    def tail(self) -> str:
        """The last ~2000 characters of output."""
        return self._native.console_tail(self._port)

    @property
    def dropped(self) -> int:
        """How many of the oldest output bytes were let go to keep within the VM's
        ``console_limit`` (0 unless the guest printed more than that)."""
        return self._native.console_dropped(self._port)

    def read(self, offset: int, timeout: float = 0.1) -> ConsoleChunk:
        """The raw output from byte ``offset`` on, waiting up to ``timeout`` seconds for some to
        arrive (empty ``data`` if none did, or the VM is not running), and the offset it starts
        at: ``offset``, or the oldest kept byte's if those from ``offset`` were dropped. For
        streaming the console elsewhere: keep ``offset = chunk.offset + len(chunk.data)``."""
        start, data = self._native.console_read(offset, float(timeout), self._port)
        return ConsoleChunk(start, data)

    def expect(self, pattern: Union[str, "re.Pattern[str]"], timeout: float = 10.0) -> ConsoleMatch:
        """Waits up to ``timeout`` seconds for ``pattern`` in the output after the previous match.

        Like pexpect, each match consumes the output up to its end, so successive calls walk
        forward. The pattern uses Rust ``regex`` syntax (Python's minus look-around and
        backreferences). Raises :class:`~vmcore.ConsoleTimeout` (a ``TimeoutError``) or, if the
        VM ends first, :class:`~vmcore.ConsoleClosed`; both messages end with the console tail.
        """
        if isinstance(pattern, re.Pattern):
            pattern = pattern.pattern
        text, start, end, groups, names = self._native.console_expect(pattern, float(timeout), self._port)
        return ConsoleMatch(text, start, end, tuple(groups), tuple(names))

    def send(self, data: Union[str, bytes]) -> None:
        """Types ``data`` into the console (str is sent as UTF-8, bytes-like as is). What the
        guest cannot take yet (COM1's 16-byte FIFO is full, or a virtio console has no receive
        buffer) waits for it, up to 1 MiB; a send that would go past that raises
        :class:`~vmcore.VmStateError` and sends none of its bytes."""
        if isinstance(data, str):
            data = data.encode()
        self._native.console_send(_byte_string(data, "send's data"), self._port)

    def __repr__(self) -> str:
        where = "" if self._port is None else f" virtio {self._port}"
        return f"<vmcore.Console{where} {len(self.output_bytes)} bytes>"


class Registers:
    """A vCPU's registers by name: ``regs.rip``, ``regs["cr0"]``, ``regs.rax = 5``.

    Each read fetches fresh values from KVM; each write goes straight to the vCPU. The vCPU
    must not be running (stop the VM, or wait for it to end). :data:`REGISTER_NAMES` lists the
    names; ``cs``… are selectors, ``*_base`` hidden segment bases.
    """

    __slots__ = ("_native", "_index")
    _native: NativeVm
    _index: int

    def __init__(self, native: NativeVm, index: int) -> None:
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

    def __init__(self, native: NativeVm, index: int) -> None:
        self._native = native
        self.index = index
        self._regs = Registers(native, index)

    @property
    def regs(self) -> Registers:
        """Read and write registers by name: ``vcpu.regs.rip``, ``vcpu.regs.rax = 1``."""
        return self._regs

    def __repr__(self) -> str:
        return f"<vmcore.Vcpu {self.index}>"


@dataclass(frozen=True)
class VirtioDevice:
    """A virtio-mmio device of a VM (see :meth:`Vm.add_disk`, :meth:`Vm.add_net`,
    :meth:`Vm.add_rng`). The guest finds it in the ACPI tables (``_HID "LNRO0005"``)."""

    index: int
    """Position among the VM's virtio devices (the ACPI ``_UID``)."""
    kind: str
    """``"block"``, ``"net"``, ``"rng"`` or ``"console"``."""
    base: int
    """Guest-physical address of its register window (0x200 bytes)."""
    gsi: int
    """Its interrupt: an IOAPIC pin (16 onwards), edge-triggered."""
    description: str


PacketCallback = Callable[[bytes], Optional[bool]]
"""``on_packet(frame)``: sees each Ethernet frame the guest sends; returning ``False`` drops it,
``None`` or ``True`` lets it through."""


class Net:
    """A virtio-net device (see :meth:`Vm.add_net`): frames the guest sends pass its
    ``on_packet`` filter and go to a linked device and/or a tap; frames reach the guest from
    those or from :meth:`inject`.

    ::

        a_net, b_net = vm_a.add_net(), vm_b.add_net()
        a_net.link(b_net)            # what one guest sends, the other receives

        @a_net.on_packet
        def watch(frame: bytes) -> bool:
            return frame[12:14] != b"\x86\xdd"   # drop IPv6
    """

    def __init__(self, native: NativeVm, info: Dict[str, Any]) -> None:
        self._native = native
        self.device = VirtioDevice(**{k: info[k] for k in ("index", "kind", "base", "gsi", "description")})
        self.mac: str = info["mac"]
        """The guest's MAC address, ``"02:76:..."``."""
        self.tap: Optional[str] = info["tap"]
        """The tap interface it is attached to, if any."""

    @property
    def index(self) -> int:
        return self.device.index

    def inject(self, frame: bytes) -> None:
        """Queues an Ethernet frame (14 to 1518 bytes, no FCS) for the guest; it arrives once
        the guest's driver has a receive buffer for it."""
        self._native.net_inject(self.index, _byte_string(frame, "an injected frame"))

    def link(self, other: "Net") -> None:
        """Connects this device to ``other`` (usually another VM's) back to back: frames one
        guest sends (and its filter passes) arrive at the other. A link does not keep the other
        VM alive; closing either ends it."""
        self._native.net_link(self.index, other._native, other.index)

    def unlink(self) -> None:
        """Disconnects this device from its linked peer, both ways."""
        self._native.net_unlink(self.index)

    def on_packet(self, callback: Optional[PacketCallback]) -> Optional[PacketCallback]:
        """Sets (or with None clears) the filter; usable as a decorator. It runs on the device's
        worker thread with the GIL, never on a vCPU thread; an exception is logged (logger
        ``vmcore``) and drops the frame."""
        self._native.net_set_filter(self.index, callback)
        return callback

    @property
    def stats(self) -> Dict[str, int]:
        """Frame counters: ``tx_frames``, ``tx_dropped`` (filtered or malformed),
        ``rx_frames``, ``rx_dropped`` (too large, or too many waiting)."""
        return self._native.net_stats(self.index)

    def __repr__(self) -> str:
        tap = f" tap={self.tap}" if self.tap else ""
        return f"<vmcore.Net {self.index} {self.mac}{tap}>"


# Every VM not yet collected, for `_close_open_vms`.
_open_vms: "weakref.WeakSet[Vm]" = weakref.WeakSet()


@atexit.register
def _close_open_vms() -> None:
    """Closes the VMs still open when the interpreter exits, while it can still serve their vCPU
    threads. Left to finalization, a vCPU thread ending then waits forever for the GIL, and so
    does the finalizer that joins it: a script that ran a VM and never closed it did not exit."""
    for vm in list(_open_vms):
        vm.close()
    _native.interpreter_exiting()


class Vm:
    """A KVM virtual machine.

    ::

        with vmcore.Vm(memory="64M") as vm:
            vm.load_flat(code, address=0x100000, mode="long")
            outcome = vm.run(timeout=5)
            vm.console.expect(r"hello")

    ``memory`` is bytes or a size such as ``"64M"`` or ``"1G"``; ``vcpus`` the number of
    virtual CPUs; ``tee`` copies console output as it arrives to ``"stdout"``, ``"stderr"``
    or a file path. ``precise`` chooses how precise CPUID and control-register hooks find
    their instructions: ``"step"`` single-steps the guest (always correct, one exit per
    instruction); ``"trap"`` replaces those instructions in the loaded image with ``int3``
    (one exit per hooked instruction; code outside the image is not seen, and the guest
    would see the ``int3`` if it read its own code). ``console_limit`` is how many bytes of
    output each console keeps (the newest; 16 MiB by default): a guest printing in a loop
    cannot grow the host without bound, older bytes are dropped and counted
    (:attr:`Console.dropped`), and a tee still gets every byte. Closing the VM (``close()``, ``with``, or garbage collection) stops it and
    frees its threads, file descriptors and memory.
    """

    def __init__(
        self,
        memory: Union[int, str] = "64M",
        vcpus: int = 1,
        *,
        tee: Union[str, "os.PathLike[str]", None] = None,
        precise: Literal["step", "trap"] = "step",
        console_limit: int = _native.DEFAULT_CONSOLE_LIMIT,
    ) -> None:
        self._native = _native.NativeVm(memory, vcpus, None if tee is None else os.fspath(tee), precise, console_limit)
        self._hook_ids: Dict[Callable[..., Any], List[int]] = {}
        self._console = Console(self._native)
        self._vcpus = tuple(Vcpu(self._native, i) for i in range(self._native.vcpu_count))
        _open_vms.add(self)

    # -- loading -----------------------------------------------------------------------------

    def load_flat(self, code: bytes, address: int = 0x100000, mode: Mode = "long") -> int:
        """Copies a flat binary to ``address`` and points vCPU 0 at it; returns the entry address.

        ``"real"``: every segment is based at ``address`` (16-byte aligned; code assembled at
        origin 0), SP=0. ``"protected"``: flat 32-bit segments, paging off. ``"long"``: 64-bit
        on an identity map of the low 4 GiB. Protected and long mode use 0x500-0x8000 for the
        GDT, page tables and the initial stack (ESP/RSP = 0x8000).
        """
        return self._native.load_flat(_byte_string(code, "load_flat's code"), int(address), mode)[1]

    def load_elf(self, path: Union[str, "os.PathLike[str]"]) -> int:
        """Loads an ELF32 (entered in protected mode) or ELF64 (long mode) executable by its
        program headers' physical addresses; returns the entry address. Raises
        :class:`~vmcore.LoadError` saying what is wrong with a malformed image."""
        return self._native.load_elf(os.fspath(path))[1]

    def load_multiboot(
        self,
        path: Union[str, "os.PathLike[str]"],
        cmdline: str = "",
        modules: Sequence[ModuleSpec] = (),
    ) -> int:
        """Loads a multiboot v1 kernel the way QEMU's ``-kernel``, ``-append`` and ``-initrd``
        do; returns the entry address. The kernel sees ``"<path> <cmdline>"`` as its command
        line. Each module is a path, or ``(path, arguments)``: its command line is
        ``"<path> <arguments>"``. Entry is in 32-bit protected mode with EAX=0x2BADB002 and
        EBX pointing at the boot information (memory sizes and map, command line, modules).
        fw_cfg's kernel and command-line items are set too."""
        return self._native.load_multiboot(os.fspath(path), cmdline, _module_pairs(modules))[1]

    def load_kernel(
        self,
        path: Union[str, "os.PathLike[str]"],
        cmdline: str = "",
        modules: Sequence[ModuleSpec] = (),
    ) -> int:
        """Loads a kernel by what the file is: multiboot (see :meth:`load_multiboot`), Linux
        (see :meth:`load_linux`; at most one module, its initrd) or ELF (see :meth:`load_elf`;
        it takes no command line or modules). Returns the entry."""
        return self._native.load_kernel(os.fspath(path), cmdline, _module_pairs(modules))[1]

    def load_linux(
        self,
        kernel: Union[str, "os.PathLike[str]"],
        initrd: Optional[Union[str, "os.PathLike[str]"]] = None,
        cmdline: str = "console=ttyS0",
        *,
        protocol: LinuxProtocol = "auto",
        decompress: bool = True,
        adapt_to_host: bool = True,
    ) -> LinuxKernel:
        """Loads a Linux kernel, a bzImage or an ELF ``vmlinux``, with its initrd and command line.

        By default (``decompress=True``) a bzImage's payload (gzip, xz, lz4 or zstd) is
        decompressed on the host and the kernel proper is entered directly; with
        ``decompress=False`` the guest runs the bzImage's own decompressor, which takes minutes
        on hosts that emulate guest kernel code. ``protocol="auto"`` enters through PVH when the
        kernel carries a PVH note and through the 64-bit boot protocol otherwise; ``"pvh"`` and
        ``"linux64"`` insist on one. With ``adapt_to_host`` (the default), parameters that keep
        the kernel off instructions this host's KVM cannot run in kernel mode, and off boot work
        that takes minutes where kernel code is emulated, are appended (on kvm_pvm hosts
        ``noxsave clearcpuid=137,141,308``, an ``initcall_blacklist=`` and
        ``cryptomgr.notests=1 nosoftlockup``, each unless ``cmdline`` sets it (your
        ``initcall_blacklist=`` adds to ours); nothing on
        VT-x/AMD-V; see ``docs/host.md``); the final command line is in the result's
        ``cmdline``. The memory map, ACPI tables and command line are what a PC
        firmware and boot loader would hand over. Raises :class:`~vmcore.LoadError` for a file
        that is not a Linux kernel, is truncated, or does not fit in the VM's memory.
        """
        info = self._native.load_linux(
            os.fspath(kernel),
            None if initrd is None else os.fspath(initrd),
            cmdline,
            protocol,
            decompress,
            adapt_to_host,
        )
        return LinuxKernel(**info)

    def add_fw_cfg_file(self, name: str, data: bytes) -> None:
        """Adds a named file to fw_cfg (QEMU's ``-fw_cfg name=...,file=...``)."""
        self._native.add_fw_cfg_file(name, _byte_string(data, "an fw_cfg file's data"))

    # -- devices -----------------------------------------------------------------------------

    def add_disk(
        self, path: Union[str, "os.PathLike[str]"], readonly: bool = False, *, serial: Optional[str] = None
    ) -> VirtioDevice:
        """Attaches a raw disk image as a virtio-blk device (before the first run); Linux sees
        it as ``/dev/vdX`` once the ``virtio_mmio`` and ``virtio_blk`` drivers load.

        ``readonly`` opens the file read-only and tells the guest so; writes fail with an I/O
        error. Flushes are honoured (the file is fdatasync'ed). ``serial`` (at most 20 bytes)
        is what the guest reads as the disk's ID (``/sys/block/vdX/serial``).
        """
        return VirtioDevice(**self._native.add_disk(os.fspath(path), readonly, serial))

    def add_net(
        self, tap: Optional[str] = None, on_packet: Optional[PacketCallback] = None, mac: Optional[str] = None
    ) -> Net:
        """Adds a virtio-net device (before the first run); see :class:`Net`.

        ``tap`` attaches it to a tap interface: an existing one by name, or a new one (as root),
        removed when the VM closes; a pattern such as ``"vm%d"`` lets the kernel pick the number
        (:attr:`Net.tap` says which). ``on_packet(frame)`` sees each frame the guest sends and
        drops it by returning ``False``. ``mac`` is the guest's address (``"02:00:00:00:00:01"``);
        by default a locally administered one unique in this process.
        """
        return Net(self._native, self._native.add_net(tap, on_packet, mac))

    def add_rng(self) -> VirtioDevice:
        """Adds a virtio-rng device (before the first run): the guest's ``hwrng`` reads the
        host's getrandom."""
        return VirtioDevice(**self._native.add_rng())

    def add_console(self) -> Console:
        """Adds a virtio-console device (before the first run): a second console beside COM1,
        Linux's ``/dev/hvc0`` once ``virtio_console`` is loaded, with the same ``expect``,
        ``send`` and ``tail``."""
        return Console(self._native, self._native.add_console()["index"])

    @property
    def virtio_devices(self) -> List[VirtioDevice]:
        """The VM's virtio devices, in the order they were added."""
        return [VirtioDevice(**d) for d in self._native.virtio_devices()]

    # -- running -----------------------------------------------------------------------------

    def run(self, timeout: Optional[float] = None, progress: bool = False) -> Outcome:
        """Runs until the guest ends the run, ``timeout`` seconds pass (outcome ``"timeout"``),
        or another thread or a hook stops or pauses it. A VM whose last run timed out, was
        stopped or was paused continues the same guest: registers, memory and devices are as
        the guest left them.

        The GIL is released while the guest runs. Ctrl-C stops the VM and raises
        ``KeyboardInterrupt``. With ``progress``, elapsed time, exits and the console's last
        line are shown as it runs (updated in place in a notebook).
        """
        if not progress:
            return Outcome._from_native(self._native.run(timeout))
        from .jupyter import Progress

        shown = Progress(self)
        self.start(timeout)
        try:
            while (outcome := self.wait(0.5)) is None:
                shown.update()
        finally:
            shown.close()
        return outcome

    def start(self, timeout: Optional[float] = None) -> None:
        """Starts the guest in the background; with ``timeout`` the run ends by itself then."""
        self._native.start(timeout)

    def wait(self, timeout: Optional[float] = None) -> Optional[Outcome]:
        """Waits up to ``timeout`` seconds (forever with None) for the run to end or pause;
        returns its outcome, or None if it is still running. A hook cannot wait for its own VM
        (:class:`VmStateError`): the run waits for the hook."""
        d = self._native.wait(timeout)
        return None if d is None else Outcome._from_native(d)

    def pause(self) -> None:
        """Pauses a running guest: its vCPUs leave it, and whoever waits for the run gets
        outcome ``"paused"``. Returns once no vCPU runs, so registers and memory can be read
        and written; from a hook of this VM it returns at once and the pause takes effect when
        the hook returns. Pausing a paused VM does nothing; any other state raises
        :class:`VmStateError`."""
        self._native.pause()

    def resume(self) -> None:
        """Continues a paused guest in the background, with what was left of its run's
        timeout (time spent paused does not count). Raises :class:`VmStateError` unless the VM
        is paused."""
        self._native.resume()

    @property
    def state(self) -> VmState:
        """Where the VM is in its life: ``"created"``, ``"loaded"``, ``"running"``,
        ``"paused"``, ``"ended"`` or ``"closed"`` (docs/lifecycle.md says which call is legal
        in each)."""
        return self._native.state  # type: ignore[return-value]

    def stop(self) -> Optional[Outcome]:
        """Stops a running or paused guest (outcome ``"stopped"``) and returns the last run's
        outcome, or None if the VM never ran. Stopping a VM that has ended is harmless. From a
        hook of this VM it returns None at once, and the run ends when the hook returns."""
        d = self._native.stop()
        return None if d is None else Outcome._from_native(d)

    def close(self) -> None:
        """Stops the VM and frees its threads, file descriptors and guest memory. Idempotent.
        From a hook of this VM the run ends when the hook returns, and the rest is freed as it
        unwinds."""
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

    # -- hooks -------------------------------------------------------------------------------

    def _hook(self, kind: str, **params: Any) -> Callable[[Hook], Hook]:
        vm_ref = weakref.ref(self)

        def register(fn: Hook) -> Hook:
            def call(native_event: _native.HookEvent) -> None:
                vm = vm_ref()
                if vm is None:
                    return
                event = HookEvent(native_event, vm)
                answer = fn(event)
                if answer is None:
                    return
                if native_event.kind == "cpuid":
                    native_event.cpuid = _cpuid_answer(answer)
                elif native_event.is_write is False:
                    native_event.value = _supplied_value(answer)

            hook_id = self._native.add_hook(kind, params, call)
            self._hook_ids.setdefault(fn, []).append(hook_id)
            return fn

        return register

    def on_cpuid(self, leaf: int, subleaf: Optional[int] = None, precise: bool = False) -> Callable[[Hook], Hook]:
        """Decorator: ``fn(ev)`` answers CPUID ``leaf`` (and ``subleaf``) with a 4-tuple
        ``(eax, ebx, ecx, edx)``, or None to pass through.

        Static (default): asked once per vCPU before the first run to build the CPUID table,
        at no cost while the guest runs; :meth:`cpuid_ignored` lists entries the host's KVM did
        not keep. ``precise=True``: called for every CPUID the guest executes, with its ``rip``
        (single-steps the guest while such a hook exists).
        """
        return self._hook("cpuid", leaf=leaf, subleaf=subleaf, precise=precise)

    def on_cr(self, cr: int, write: Optional[bool] = True) -> Callable[[Hook], Hook]:
        """Decorator: ``fn(ev)`` on ``mov`` to (``write=True``) or from (``write=False``)
        control register ``cr`` (0, 2, 3, 4 or 8; also ``clts``, ``lmsw``, ``smsw`` for CR0), both
        with ``write=None``. ``ev.old`` is the current value, ``ev.value`` the new one: assign it
        to rewrite, ``ev.veto()`` to drop the write; a read hook returns the value to read.
        Precise: the guest is single-stepped while such a hook exists.
        """
        return self._hook("cr", cr=cr, write=write)

    def on_msr(self, index: int, write: Optional[bool] = False) -> Callable[[Hook], Hook]:
        """Decorator: ``fn(ev)`` on RDMSR (``write=False``, return the value or None) or WRMSR
        (``write=True``: ``ev.value``, ``ev.veto()``) of MSR ``index``; both with ``write=None``.
        Works for MSRs the host does not know; up to 16 MSRs."""
        return self._hook("msr", index=index, write=write)

    def on_io(self, port: int, size: int = 1, write: Optional[bool] = None) -> Callable[[Hook], Hook]:
        """Decorator: ``fn(ev)`` on IN/OUT to ports ``port .. port+size-1`` (reads and writes
        unless ``write`` says which). A read hook returns the value or None (then the device,
        or all-ones, answers); a write hook may assign ``ev.value`` or call ``ev.veto()``."""
        return self._hook("io", port=port, size=size, write=write)

    def on_mmio(self, address: int, size: int, write: Optional[bool] = None) -> Callable[[Hook], Hook]:
        """Decorator: ``fn(ev)`` on MMIO to ``[address, address+size)`` where no RAM is mapped;
        like :meth:`on_io`."""
        return self._hook("mmio", address=address, size=size, write=write)

    def on_breakpoint(self, address: int) -> Callable[[Hook], Hook]:
        """Decorator: ``fn(ev)`` when execution reaches ``address`` (a hardware breakpoint; at
        most :attr:`breakpoint_capacity` addresses)."""
        return self._hook("breakpoint", address=address)

    @property
    def breakpoint_capacity(self) -> int:
        """How many breakpoint addresses hooks may use: x86's four debug registers, less the
        one vmcore needs on hosts whose KVM leaves SYSCALLs half done (see docs/host.md)."""
        return self._native.breakpoint_capacity

    def on_step(self) -> Callable[[Hook], Hook]:
        """Decorator: ``fn(ev)`` after every instruction (single-step); ``ev.rip`` is the next."""
        return self._hook("step")

    def on_hlt(self) -> Callable[[Hook], Hook]:
        """Decorator: ``fn(ev)`` once when a vCPU is found halted with interrupts off (found
        within about 50 ms); ``ev.stop(result)`` ends the run, else it ends ``"halted"`` when
        every vCPU is."""
        return self._hook("hlt")

    def on_shutdown(self) -> Callable[[Hook], Hook]:
        """Decorator: ``fn(ev)`` on a triple fault, before the run ends with ``"shutdown"``."""
        return self._hook("shutdown")

    def on_exit(self) -> Callable[[Hook], Hook]:
        """Decorator: ``fn(ev)`` on every exit from KVM (``ev.reason`` names it)."""
        return self._hook("exit")

    def remove_hook(self, fn: Callable[..., Any]) -> bool:
        """Removes every hook ``fn`` was registered for; returns whether there was one."""
        ids = self._hook_ids.pop(fn, [])
        return any([self._native.remove_hook(i) for i in ids])

    def cpuid_ignored(self) -> List[Tuple[int, int, int, Tuple[int, ...], Optional[Tuple[int, ...]]]]:
        """Static CPUID entries the host's KVM did not keep, as (vcpu, leaf, subleaf, wanted,
        kept): use ``precise=True`` for those leaves. Known after the first start."""
        return [(v, l, s, tuple(w), None if k is None else tuple(k)) for v, l, s, w, k in self._native.cpuid_ignored()]

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
        self._native.write_phys(address, _byte_string(data, "write_phys's data"))

    def read_virt(self, vcpu: int, address: int, length: int) -> bytes:
        """Reads guest-virtual memory through vCPU ``vcpu``'s page tables (no paging, 32-bit,
        PAE, 4- and 5-level). The vCPU must not be running."""
        return self._native.read_virt(vcpu, address, length)

    def write_virt(self, vcpu: int, address: int, data: bytes) -> None:
        """Writes guest-virtual memory through vCPU ``vcpu``'s page tables; nothing is written
        unless every page is mapped."""
        self._native.write_virt(vcpu, address, _byte_string(data, "write_virt's data"))

    def translate(self, vcpu: int, address: int) -> int:
        """The guest-physical address vCPU ``vcpu`` would reach at guest-virtual ``address``."""
        return self._native.translate(vcpu, address)

    def sample_rip(self, on: bool = True) -> None:
        """Turns guest RIP sampling on (or off): while it is on, every vCPU's instruction
        pointer is sampled every 10 ms of wall time, CPU-bound stretches with no exits
        included. Samples add up across runs until :meth:`clear_rip_samples`."""
        self._native.sample_rip(on)

    def rip_samples(self) -> Dict[int, int]:
        """The samples so far: ``{rip: count}``, every vCPU merged."""
        return self._native.rip_samples()

    def clear_rip_samples(self) -> None:
        self._native.clear_rip_samples()

    def profile(self, symbol_map: Union[str, "os.PathLike[str]"], top: Optional[int] = None) -> List[Tuple[str, int]]:
        """The RIP samples by kernel function, the busiest first: ``[(function, samples)]``,
        at most ``top`` of them. ``symbol_map`` is the path of the kernel's ``System.map`` (or
        a copy of the guest's ``/proc/kallsyms``). Samples no symbol covers count as
        ``"[lower half]"`` (user mode, or code at physical addresses: early boot, a vCPU not
        started yet) or ``"[unknown]"``."""
        with open(symbol_map, encoding="utf-8", errors="replace") as text:
            ranked = self._native.profile(text.read())
        return ranked if top is None else ranked[:top]

    def exit_timeline(self) -> List[Tuple[float, Dict[str, int]]]:
        """Cumulative exits by reason over time: ``[(seconds since the first start, {reason:
        count})]``, sampled every 1 to 50 ms and at the end of each run."""
        return self._native.exit_timeline()

    def plot_exits(self, ax: Any = None) -> Any:
        """A matplotlib chart of exits per second by reason over time (needs matplotlib);
        returns the Figure."""
        from .jupyter import plot_exits

        return plot_exits(self, ax)

    def _repr_html_(self) -> str:
        from .jupyter import vm_html

        return vm_html(self)

    def stats(self) -> Dict[str, Any]:
        """Exit counters: ``exits`` by reason, ``exits_total``, ``ports`` (port exits by port),
        unhandled port and MMIO accesses by port or address (unhandled reads return all-ones,
        writes are dropped), ``msr_reads``/``msr_writes`` by index, ``cpuid_leaves`` and
        ``cr_accesses`` emulated by precise mode, ``emulated`` (instructions KVM's emulator
        could not run and vmcore emulated instead, by mnemonic: ``xsave``, ``int3``, ...),
        ``hook_events`` by kind, ``hook_calls`` and ``hook_seconds`` (time spent in hooks),
        ``handling_seconds`` (vCPU threads' time in userspace between KVM_RUN calls, summed over
        vCPUs) and ``emulation_seconds`` (the part of it spent emulating instructions). Each
        by-key counter keeps at most 4096 keys (the guest chooses them); ``uncounted_keys``
        counts the events beyond. ``console_dropped``: output bytes the consoles let go to stay
        within ``console_limit``."""
        return self._native.stats()

    def __repr__(self) -> str:
        if self.closed:
            return "<vmcore.Vm closed>"
        state = "running" if self.is_running else (str(self.outcome) if self.outcome else "ready")
        return f"<vmcore.Vm memory={self.memory_size >> 20}M vcpus={len(self._vcpus)} {state}>"
