"""vmcore as an unprivileged user: read-write access to /dev/kvm is all it needs. A throwaway
system user gets /dev/kvm through an ACL and runs, with this suite's own tests, a guest, a
virtio disk the guest reads, and a tap it may not create. Needs root to create the user; skips,
saying so, elsewhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from vmcore.pytest_plugin import kvm_available

USER = "vmcore-nonroot"
ROOT = Path(__file__).resolve().parents[2]
# Tests of this suite that make sense for any user; each runs as USER.
AS_USER = [
    "tests/python/test_foundation.py::test_long_mode_flat_guest_prints",
    "tests/python/test_virtio.py::test_a_guest_reads_a_disk",
    "tests/python/test_nonroot.py::test_creating_a_tap_without_cap_net_admin_says_what_to_do",
]


@pytest.fixture(scope="module")
def unprivileged_user() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("creating a throwaway user needs root: the non-root test did not run")
    missing = [tool for tool in ("useradd", "userdel", "setfacl", "runuser") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the non-root test did not run: {', '.join(missing)} missing (scripts/setup installs acl)")
    if not kvm_available():
        pytest.skip("/dev/kvm is absent: the non-root test did not run")
    created = subprocess.run(["id", USER], capture_output=True).returncode != 0
    if created:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER], check=True)
    subprocess.run(["setfacl", "-m", f"u:{USER}:rw", "/dev/kvm"], check=True)
    try:
        yield USER
    finally:
        subprocess.run(["setfacl", "-x", f"u:{USER}", "/dev/kvm"], check=False)
        if created:
            subprocess.run(["userdel", USER], check=False)


def interpreter_for(user: str) -> str:
    """This test run's Python if `user` may execute it, else the system's (a Python built under
    /root, as pyenv does, is out of reach): it finds vmcore and pytest through PYTHONPATH."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        if subprocess.run(["runuser", "-u", user, "--", candidate, "-c", "pass"], capture_output=True).returncode == 0:
            return candidate
    pytest.fail(f"no Python that {user} may run: neither {sys.executable} nor /usr/bin/python3")


def test_an_unprivileged_user_with_access_to_dev_kvm_runs_guests_and_disks(unprivileged_user: str) -> None:
    import vmcore

    # Everything the run writes goes to a directory the user owns; the repository stays read-only.
    scratch = Path(tempfile.mkdtemp(prefix="vmcore-nonroot-"))
    try:
        shutil.chown(scratch, unprivileged_user)
        package_root = Path(vmcore.__file__).resolve().parents[1]
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(scratch),
            "PYTHONPATH": os.pathsep.join([str(package_root), sysconfig.get_paths()["purelib"]]),
            "PYTHONDONTWRITEBYTECODE": "1",
            "VMCORE_NONROOT_RUN": "1",
        }
        command = [
            "runuser", "-u", unprivileged_user, "--",
            interpreter_for(unprivileged_user), "-m", "pytest", "-q", "-p", "no:cacheprovider",
            f"--basetemp={scratch / 'pytest'}", "--rootdir", str(ROOT), *AS_USER,
        ]
        run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
        assert f"{len(AS_USER)} passed" in run.stdout, run.stdout[-2000:]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def test_creating_a_tap_without_cap_net_admin_says_what_to_do(vm_factory) -> None:
    if os.environ.get("VMCORE_NONROOT_RUN") != "1":
        pytest.skip("runs as the unprivileged user, from the test above")
    import vmcore

    vm = vm_factory(memory="32M")
    with pytest.raises(vmcore.VmIOError, match=r"(/dev/net/tun|CAP_NET_ADMIN).*ip tuntap add dev vmcore-t0 mode tap user"):
        vm.add_net(tap="vmcore-t0")
