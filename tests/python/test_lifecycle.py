"""A VM's life from Python: runs that time out and continue, pause and resume, stop and close from
hooks and threads, garbage collection of VMs their hooks refer to, and a stress test of random
operations across threads. Each case here once hung the interpreter."""

from __future__ import annotations

import gc
import os
import random
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, TypeVar

import pytest

import vmcore

# Where count.bin keeps the counter it increments forever.
COUNTER = 0x180000
SERIAL = 0x3F8
# Every call must come back within this (the bound); measured, not slept.
PROMPT = 2.0

T = TypeVar("T")


def counter(vm: vmcore.Vm) -> int:
    return int.from_bytes(vm.read_phys(COUNTER, 8), "little")


def promptly(what: str, call: Callable[[], T]) -> T:
    started = time.monotonic()
    try:
        return call()
    finally:
        took = time.monotonic() - started
        assert took < PROMPT, f"{what} took {took:.2f} s"


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def os_threads() -> int:
    """Every thread of the process, the VMs' own (vCPU, supervisor, virtio) included."""
    return len(os.listdir("/proc/self/task"))


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def settles(measure: Callable[[], int], target: int, timeout: float = 5.0) -> int:
    """Polls `measure` until it is back at `target` or below (VM file descriptors are closed on
    a background thread, and threads take a moment to exit); returns the last value."""
    deadline = time.monotonic() + timeout
    while (value := measure()) > target and time.monotonic() < deadline:
        time.sleep(0.01)
    return value


def test_a_run_that_timed_out_continues_the_same_guest_a_hundred_times(vm, guests):
    vm.load_flat(guests.bytes("count.bin"))
    last = 0
    for round in range(100):
        outcome = promptly("run", lambda: vm.run(timeout=0.002))
        assert outcome.reason == "timeout", (round, outcome)
        now = counter(vm)
        assert now >= last, f"round {round}: the counter went back from {last} to {now}"
        last = now
    assert last > 0, "the guest never counted"
    assert vm.console.output.count("counting") == 1, "the guest started once"
    assert vm.state == "ended"


def test_stop_from_a_hook_ends_the_run_as_stopped(vm, guests):
    vm.load_flat(guests.bytes("count.bin"))
    answers: List[Optional[vmcore.Outcome]] = []

    @vm.on_io(SERIAL, write=True)
    def stop_at_the_first_byte(ev):
        if not answers:
            answers.append(ev.vm.stop())

    outcome = promptly("run", lambda: vm.run(timeout=30))
    assert outcome.reason == "stopped", outcome
    assert answers == [None], "stop() from a hook returns before the run has ended"
    assert vm.console.output == "c", "the stop took effect when the hook returned"


def test_pause_from_a_hook_then_resume(vm, guests):
    vm.load_flat(guests.bytes("count.bin"))
    refusals: List[str] = []

    @vm.on_io(SERIAL, write=True)
    def pause_once(ev):
        if not refusals:
            ev.vm.pause()
            with pytest.raises(vmcore.VmStateError) as raised:
                ev.vm.wait()
            refusals.append(str(raised.value))

    outcome = promptly("run", lambda: vm.run(timeout=30))
    assert outcome.reason == "paused" and vm.state == "paused", outcome
    assert "own VM" in refusals[0]
    paused_at = counter(vm)
    time.sleep(0.05)
    assert counter(vm) == paused_at, "a paused guest does not run"
    promptly("resume", vm.resume)
    vm.console.expect("counting\n", timeout=10)
    deadline = time.monotonic() + 10
    while counter(vm) == paused_at:
        assert time.monotonic() < deadline, "the resumed guest does not count"
        time.sleep(0.001)
    assert promptly("stop", vm.stop).reason == "stopped"


def test_pause_and_resume_from_another_thread(vm, guests):
    vm.load_flat(guests.bytes("count.bin"))
    vm.start(timeout=60)
    vm.console.expect("counting", timeout=10)
    waited: List[vmcore.Outcome] = []
    waiter = threading.Thread(target=lambda: waited.append(vm.wait()))
    waiter.start()
    promptly("pause", vm.pause)
    waiter.join(PROMPT)
    assert [o.reason for o in waited] == ["paused"], "a waiter returns at the pause"
    assert vm.state == "paused" and vm.outcome.reason == "paused"
    assert 0x100000 <= vm.vcpus[0].regs.rip < 0x101000, "registers are readable while paused"
    promptly("resume", vm.resume)
    assert vm.state == "running"
    assert promptly("stop", vm.stop).reason == "stopped"
    assert vm.console.output.count("counting") == 1


def test_close_from_a_hook(vm_factory, guests):
    vm = vm_factory()
    vm.load_flat(guests.bytes("count.bin"))

    @vm.on_io(SERIAL, write=True)
    def close_at_the_first_byte(ev):
        ev.vm.close()

    vm.start(timeout=30)
    deadline = time.monotonic() + PROMPT
    while vm.state != "closed":
        assert time.monotonic() < deadline, vm.state
        time.sleep(0.001)
    assert vm.closed
    with pytest.raises(vmcore.VmStateError, match="closed"):
        vm.start()


def test_states_through_a_life(vm, guests):
    assert vm.state == "created"
    with pytest.raises(vmcore.VmStateError, match="only a running VM can pause"):
        vm.pause()
    vm.load_flat(guests.bytes("hello-long.bin"))
    assert vm.state == "loaded"
    assert vm.run(timeout=10).reason == "halted"
    assert vm.state == "ended"
    with pytest.raises(vmcore.VmStateError, match="only a paused VM can resume"):
        vm.resume()
    vm.close()
    assert vm.state == "closed"


def test_vms_whose_hooks_refer_to_them_are_freed_by_the_garbage_collector(guests):
    def self_referencing_vm() -> None:
        vm = vmcore.Vm(memory="32M")
        vm.load_flat(guests.bytes("hello-long.bin"))

        @vm.on_io(SERIAL, write=True)
        def refers_to_its_vm(ev):
            assert vm.state == "running"

        assert vm.run(timeout=10).reason == "halted"

    self_referencing_vm()  # the first VM starts process-wide helpers (the fd reaper)
    gc.collect()
    fds, threads = settles(open_fds, 0, timeout=0.5), os_threads()
    for _ in range(30):
        self_referencing_vm()
    assert open_fds() >= fds + 30, "the VMs are alive until the collector breaks their cycles"
    gc.collect()
    assert settles(open_fds, fds) == fds, "every VM's file descriptors were closed"
    assert settles(os_threads, threads) == threads, "every VM's threads ended"


def test_a_heartbeat_keeps_ticking_while_another_thread_blocks_in_the_vm(vm, guests):
    beats = [0]
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(0.005):
            beats[0] += 1

    ticker = threading.Thread(target=heartbeat)
    ticker.start()

    def beats_during(call: Callable[[], object]) -> int:
        before = beats[0]
        call()
        return beats[0] - before

    try:
        vm.load_flat(guests.bytes("spin.bin"))

        @vm.on_cpuid(0x4000_0000)
        def slow_static_answer(ev):
            time.sleep(0.2)  # start() builds the CPUID table: a blocking start

        assert beats_during(lambda: vm.start(timeout=0.3)) >= 5, "start"
        assert beats_during(lambda: vm.wait()) >= 5, "wait"
        assert beats_during(lambda: vm.run(timeout=0.3)) >= 5, "run"
        vm.start(timeout=5)
        with pytest.raises(vmcore.ConsoleTimeout):
            assert beats_during(lambda: vm.console.expect("never printed", timeout=0.3)) >= 5
        vm.stop()
    finally:
        stop.set()
        ticker.join()


GUESTS = ["spin.bin", "hello-long.bin", "count.bin"]
OPERATIONS = ["new", "start", "run", "wait", "pause", "resume", "stop", "close", "drop"]
IN_HOOK = ["stop", "pause", "close", None]


class Pool:
    """VMs shared by the stress threads, by slot."""

    def __init__(self, slots: int) -> None:
        self.vms: List[Optional[vmcore.Vm]] = [None] * slots
        self.lock = threading.Lock()

    def pick(self, rng: random.Random) -> tuple[int, Optional[vmcore.Vm]]:
        slot = rng.randrange(len(self.vms))
        with self.lock:
            return slot, self.vms[slot]

    def put(self, slot: int, vm: Optional[vmcore.Vm]) -> None:
        with self.lock:
            self.vms[slot] = vm  # the VM it replaces is dropped without close


def new_vm(rng: random.Random, guests) -> vmcore.Vm:
    vm = vmcore.Vm(memory="16M")
    vm.load_flat(guests.bytes(rng.choice(GUESTS)))
    action = rng.choice(IN_HOOK)
    if action is not None:
        acted = []

        @vm.on_io(SERIAL, write=True)
        def act(ev):
            if not acted:
                acted.append(action)
                getattr(ev.vm, action)()

    return vm


def operate(rng: random.Random, pool: Pool, guests, counts: Dict[str, int], slowest: List[float]) -> None:
    op = rng.choice(OPERATIONS)
    slot, vm = pool.pick(rng)
    started = time.monotonic()
    try:
        if op == "new":
            pool.put(slot, new_vm(rng, guests))
        elif op == "drop":
            pool.put(slot, None)
        elif vm is not None:
            timeout = rng.uniform(0.001, 0.02)
            call = {
                "start": lambda: vm.start(timeout=timeout),
                "run": lambda: vm.run(timeout=timeout),
                "wait": lambda: vm.wait(timeout=timeout),
                "pause": vm.pause,
                "resume": vm.resume,
                "stop": vm.stop,
                "close": vm.close,
            }[op]
            call()
        counts[op] = counts.get(op, 0) + 1
    except vmcore.VmStateError:
        counts["refused"] = counts.get("refused", 0) + 1  # a legal refusal: the state moved on
    took = time.monotonic() - started
    slowest[0] = max(slowest[0], took)
    assert took < PROMPT, f"{op} took {took:.2f} s"


def test_five_thousand_random_operations_across_four_threads(guests):
    seed = int(os.environ.get("VMCORE_STRESS_SEED", random.randrange(1 << 32)))
    print(f"stress seed {seed} (VMCORE_STRESS_SEED={seed} repeats it)")
    warm = new_vm(random.Random(0), guests)  # process-wide helpers start once, before measuring
    warm.run(timeout=0.01)
    del warm
    gc.collect()
    fds = settles(open_fds, 0, timeout=0.5)
    threads = os_threads()
    rss = resident_bytes()

    pool = Pool(slots=6)
    counts: Dict[str, int] = {}
    slowest = [0.0]
    failures: List[BaseException] = []

    def worker(index: int) -> None:
        rng = random.Random(seed + index)
        try:
            for _ in range(1250):
                operate(rng, pool, guests, counts, slowest)
        except BaseException as e:  # reported on the main thread
            failures.append(e)

    started = time.monotonic()
    workers = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(600)
        assert not w.is_alive(), "a stress thread hung"
    elapsed = time.monotonic() - started
    print(f"5000 operations in {elapsed:.1f} s, slowest call {slowest[0] * 1000:.0f} ms: {sorted(counts.items())}")
    if failures:
        raise failures[0]

    for slot in range(len(pool.vms)):
        pool.put(slot, None)
    gc.collect()
    assert settles(open_fds, fds) == fds, "file descriptors leaked"
    assert settles(os_threads, threads) == threads, "threads leaked"
    grown = resident_bytes() - rss
    assert grown < 64 << 20, f"resident memory grew by {grown >> 20} MiB"


def test_the_interpreter_exits_while_a_hooked_vm_is_still_running(guests, tmp_path):
    # A vCPU thread that ran a Python hook keeps a Python thread state; ended during
    # finalization, it waited forever for the GIL, and so did the interpreter joining it.
    script = tmp_path / "left_running.py"
    script.write_text(
        "import time, vmcore\n"
        "vm = vmcore.Vm(memory='16M')\n"
        f"vm.load_flat(open({str(guests.path('echo.bin'))!r}, 'rb').read())\n"
        "polls = []\n"
        f"vm.on_io({SERIAL + 5})(lambda ev: polls.append(ev.rip))\n"
        "vm.start()\n"
        "while not polls:\n"
        "    time.sleep(0.01)\n"
        "print('leaving with the VM polling its serial port', flush=True)\n"
    )
    finished = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert finished.returncode == 0, finished.stderr
    assert "leaving" in finished.stdout
