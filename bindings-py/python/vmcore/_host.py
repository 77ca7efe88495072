"""What this host's KVM does, as vmcore probed it (once per process)."""

from __future__ import annotations

from typing import Dict, List, Optional, TypedDict, cast

from . import _native


class HostInfo(TypedDict):
    """The result of :func:`host_info`."""

    #: The KVM module serving /dev/kvm: "kvm_intel", "kvm_amd", "kvm_pvm" or "unknown". For
    #: reports; decide on the facts below instead.
    flavour: str
    #: KVM's API version, or None where /dev/kvm cannot be opened.
    api_version: Optional[int]
    #: The KVM capabilities vmcore uses, and whether this host has each.
    capabilities: Dict[str, bool]
    #: Guest kernel code runs through KVM's instruction emulator (a software KVM).
    kernel_code_emulated: bool
    #: A real-mode int3 reaches vmcore (site-trap mode needs it for 16-bit code).
    real_mode_int3_traps: bool
    #: Guests may enable 32-bit (non-long-mode) paging.
    paging32_works: bool
    #: A SYSCALL from guest user mode reaches the kernel at CPL0 without vmcore's help.
    user_syscalls_work: bool
    #: Debug registers vmcore keeps by default (for SYSCALL completion); hooks get the rest of
    #: the four as breakpoints (``Vm.breakpoint_capacity``).
    debug_registers_reserved: int
    #: Instructions KVM gives up on at CPL0 here and vmcore emulates (``stats()["emulated"]``
    #: names); empty where guest code runs natively.
    fallback_instructions: List[str]
    #: A control word loaded with fldcw reads back with fnstcw (False: x87 state is split).
    x87_control_round_trip: bool
    #: What ``load_linux`` appends to the command line on this host.
    linux_cmdline_adaptations: str


def host_info() -> HostInfo:
    """Facts about this host's KVM: its capabilities and quirks (``vmcore info`` prints them)."""
    return cast(HostInfo, _native.host_info())
