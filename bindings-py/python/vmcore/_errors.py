"""Exceptions raised by vmcore. Every one derives from :class:`VmError`."""

from __future__ import annotations

__all__ = [
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
    "HookError",
]


class VmError(Exception):
    """Base class of every vmcore error."""


class KvmUnavailableError(VmError):
    """``/dev/kvm`` is missing or cannot be opened by this process."""


class KvmError(VmError):
    """A KVM ioctl failed."""


class ConfigError(VmError, ValueError):
    """An argument is out of range or malformed (memory size, vCPU count, register name, pattern)."""


class LoadError(VmError):
    """A guest image is malformed, truncated, or does not fit the VM."""


class GuestMemoryError(VmError):
    """A guest-physical or guest-virtual access fell outside RAM or hit an unmapped page."""


class VmStateError(VmError):
    """The VM is in the wrong state for the call (running, closed, never started, ended)."""


class ExpectError(VmError):
    """``Console.expect`` did not find its pattern."""


class ConsoleTimeout(ExpectError, TimeoutError):
    """The pattern did not appear in time. The message ends with the console tail."""


class ConsoleClosed(ExpectError):
    """The VM ended before the pattern appeared. The message names the outcome and the console tail."""


class VmIOError(VmError, OSError):
    """A host file could not be read or written (an image, a console log)."""


class HookError(VmError):
    """A hook failed where its own exception could not be raised as it is."""
