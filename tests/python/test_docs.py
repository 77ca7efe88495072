"""Every python and lua example in docs/ runs, with GUESTS pointing at the built guests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
FENCE = re.compile(r"^```(python|lua)\n(.*?)^```", re.M | re.S)


def examples():
    for page in sorted(DOCS.glob("*.md")):
        for i, m in enumerate(FENCE.finditer(page.read_text())):
            yield pytest.param(m.group(1), m.group(2), id=f"{page.name}-{i}-{m.group(1)}")


@pytest.mark.parametrize("language,code", list(examples()))
def test_doc_example_runs(language, code, guests):
    if not os.access("/dev/kvm", os.W_OK):
        pytest.skip("/dev/kvm is absent: the examples boot guests")
    if language == "python":
        preamble = f"from pathlib import Path\nGUESTS = Path({str(guests.dir)!r})\n"
        out = subprocess.run([sys.executable, "-c", preamble + code], capture_output=True, text=True, timeout=120)
    else:
        lua = REPO / "target" / "lua"
        if not (lua / "vmcore.so").exists():
            pytest.skip("the Lua module is not built (scripts/build-lua)")
        preamble = f'package.cpath = "{lua}/?.so;" .. package.cpath\nGUESTS = "{guests.dir}"\n'
        out = subprocess.run(["lua5.4", "-"], input=preamble + code, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
