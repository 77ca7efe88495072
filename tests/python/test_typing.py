"""The package's types and documentation: mypy's stubtest against the native module, mypy on
the package, and pydoc showing real docstrings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_stubtest_passes():
    pytest.importorskip("mypy")
    out = run("-m", "mypy.stubtest", "vmcore", "--allowlist", "bindings-py/stubtest-allowlist.txt")
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_passes_on_the_package():
    pytest.importorskip("mypy")
    out = run("-m", "mypy", "bindings-py/python/vmcore")
    assert out.returncode == 0, out.stdout + out.stderr


def test_pydoc_shows_real_docstrings():
    out = run("-m", "pydoc", "vmcore.Vm")
    assert out.returncode == 0
    for text in ("A KVM virtual machine", "on_cpuid", "Decorator: ``fn(ev)`` answers CPUID", "load_multiboot"):
        assert text in out.stdout, text
