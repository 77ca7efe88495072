"""The pytest plugin, tested with pytester: a failing test's report carries its VM's console."""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["pytester"]


def test_a_failing_test_shows_the_console_tail(pytester, guests):
    if not os.access("/dev/kvm", os.W_OK):
        pytest.skip("/dev/kvm is absent")
    pytester.makepyfile(
        f"""
        def test_expects_the_wrong_greeting(vm):
            vm.load_flat(open({str(guests.path("hello-long.bin"))!r}, "rb").read())
            vm.run(timeout=5)
            assert "goodbye" in vm.console.output
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*vmcore VM 0 console tail (halted*", "hello from long mode"])


def test_markers_and_header(pytester):
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.slow
        def test_slow():
            pass

        @pytest.mark.vm(memory="32M", vcpus=2)
        def test_configured(vm):
            assert vm.memory_size == 32 << 20 and len(vm.vcpus) == 2
        """
    )
    result = pytester.runpytest("--strict-markers", "-m", "not slow")
    result.stdout.fnmatch_lines(["vmcore *: /dev/kvm *"])
    if os.access("/dev/kvm", os.W_OK):
        result.assert_outcomes(passed=1, deselected=1)
    else:
        result.assert_outcomes(skipped=1, deselected=1)
