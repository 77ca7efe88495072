"""The notebooks in notebooks/ run headless, produce their chart, and are kept without outputs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
ALL = sorted(NOTEBOOKS.glob("*.ipynb"))


@pytest.mark.parametrize("path", ALL, ids=[p.name for p in ALL])
def test_notebooks_are_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip outputs before committing"


@pytest.mark.parametrize("path", ALL, ids=[p.name for p in ALL])
def test_notebooks_execute(path, tmp_path, guests):
    if not os.access("/dev/kvm", os.W_OK):
        pytest.skip("/dev/kvm is absent: the notebooks boot guests")
    work = tmp_path / "notebooks"
    work.mkdir()
    shutil.copy(path, work)
    # The notebooks find target/guests by walking up from where they run.
    (tmp_path / "target").symlink_to(guests.dir.parent)
    nb = nbformat.read(work / path.name, as_version=4)
    if path.name == "boot-linux.ipynb" and not (guests.dir.parent / "linux" / "initramfs.cpio.gz").is_file():
        pytest.skip("no Linux guest in target/linux: run scripts/linux-guest")
    nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(work)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    if path.name == "chart-exits.ipynb":
        assert (work / "exits.png").stat().st_size > 1000
        assert any("image/png" in o.get("data", {}) for o in outputs), "the chart is shown inline"
    if path.name == "boot-linux.ipynb":
        assert (work / "linux-exits.png").stat().st_size > 1000
    if path.name == "hook-cpuid.ipynb":
        assert any("text/html" in o.get("data", {}) for o in outputs), "the VM renders as HTML"
