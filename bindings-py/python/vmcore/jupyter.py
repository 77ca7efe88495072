"""What a Vm looks like in Jupyter: an HTML summary, a chart of its exits, live progress."""

from __future__ import annotations

import html
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

if TYPE_CHECKING:
    from ._vm import Vm

REGISTERS_SHOWN = ("rip", "rsp", "rax", "rbx", "rcx", "rdx", "rflags", "cr0", "cr3", "cr4", "efer")


def vm_html(vm: "Vm") -> str:
    """State, registers, console tail and exit counts as an HTML block."""
    if vm.closed:
        return "<b>vmcore.Vm</b> (closed)"
    state = "running" if vm.is_running else (str(vm.outcome) if vm.outcome else "ready")
    parts = [f"<b>vmcore.Vm</b> {vm.memory_size >> 20} MiB, {len(vm.vcpus)} vCPU(s): <code>{html.escape(state)}</code>"]
    if not vm.is_running:
        rows = []
        for vcpu in vm.vcpus:
            try:
                regs = vcpu.regs.as_dict()
            except Exception as e:  # a vCPU stopped in a hook elsewhere, a closed VM
                rows.append(f"<tr><td>{vcpu.index}</td><td colspan=99>{html.escape(str(e))}</td></tr>")
                continue
            cells = "".join(f"<td><code>{regs[r]:#x}</code></td>" for r in REGISTERS_SHOWN)
            rows.append(f"<tr><td>{vcpu.index}</td>{cells}</tr>")
        head = "".join(f"<th>{r}</th>" for r in REGISTERS_SHOWN)
        parts.append(f"<table><tr><th>vCPU</th>{head}</tr>{''.join(rows)}</table>")
    tail = vm.console.tail()
    parts.append(f"<details open><summary>console</summary><pre>{html.escape(tail) or '(no output)'}</pre></details>")
    exits = vm.stats()["exits"]
    if exits:
        cells = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in sorted(exits.items(), key=lambda kv: -kv[1]))
        parts.append(f"<details><summary>exits</summary><table>{cells}</table></details>")
    return "\n".join(parts)


def exit_rates(timeline: List[Tuple[float, Dict[str, int]]]) -> Dict[str, Tuple[List[float], List[float]]]:
    """Exits per second by reason between consecutive samples: {reason: (times, rates)}."""
    rates: Dict[str, Tuple[List[float], List[float]]] = {}
    for (t0, c0), (t1, c1) in zip(timeline, timeline[1:]):
        if t1 <= t0:
            continue
        for reason in set(c0) | set(c1):
            times, values = rates.setdefault(reason, ([], []))
            times.append(t1)
            values.append((c1.get(reason, 0) - c0.get(reason, 0)) / (t1 - t0))
    return rates


def plot_exits(vm: "Vm", ax: Any = None) -> Any:
    """Exits per second by reason over the VM's runs, on a matplotlib Axes; returns the Figure."""
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(8, 3.5))
    else:
        fig = ax.figure
    for reason, (times, values) in sorted(exit_rates(vm.exit_timeline()).items()):
        ax.plot(times, values, label=reason, drawstyle="steps-post")
    ax.set_xlabel("seconds since the first start")
    ax.set_ylabel("exits per second")
    ax.set_title("vmcore: exits by reason")
    if ax.get_lines():
        ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    return fig


class Progress:
    """While a VM runs: elapsed time, exits, and the console's last line, updated in place in a
    notebook (IPython.display) or on one terminal line otherwise."""

    def __init__(self, vm: "Vm") -> None:
        self.vm = vm
        self.started = time.monotonic()
        self.handle: Optional[Any] = None
        try:
            from IPython import get_ipython
            from IPython.display import display

            if get_ipython() is not None:
                self.handle = display(self._text(), display_id=True)
        except ImportError:
            pass

    def _text(self) -> str:
        lines = self.vm.console.tail().rstrip("\n").splitlines()
        last = lines[-1] if lines else ""
        return f"{time.monotonic() - self.started:7.1f} s  {self.vm.stats()['exits_total']:>10} exits  {last[-80:]}"

    def update(self) -> None:
        if self.handle is not None:
            self.handle.update(self._text())
        else:
            import sys

            print("\r" + self._text(), end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.update()
        if self.handle is None:
            import sys

            print(file=sys.stderr)
