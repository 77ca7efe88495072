"""Shared fixtures for vmcore's own tests: the guest programs in tests/guests, built once."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GUEST_SOURCES = REPO / "tests" / "guests"
GUEST_DIR = REPO / "target" / "guests"


class Guests:
    """Paths and bytes of the built test guests, by file name."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def path(self, name: str) -> Path:
        p = self.dir / name
        assert p.is_file(), f"guest {name} was not built (looked for {p})"
        return p

    def bytes(self, name: str) -> bytes:
        return self.path(name).read_bytes()

    def symbol(self, name: str, symbol: str) -> int:
        """The address of a global label in a guest ELF (from binutils' nm)."""
        out = subprocess.run(["nm", str(self.path(name))], check=True, capture_output=True, text=True).stdout
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[2] == symbol:
                return int(parts[0], 16)
        raise KeyError(f"{name} has no symbol {symbol}")


@pytest.fixture(scope="session")
def guests() -> Guests:
    subprocess.run(["make", "-s", "-j2", "-C", str(GUEST_SOURCES)], check=True)
    return Guests(GUEST_DIR)
