"""scripts/build_initramfs.py: the newc writer read back (by its own reader and by GNU cpio),
module dependency resolution on made-up module trees, and the published initramfs if built."""

from __future__ import annotations

import gzip
import importlib.util
import lzma
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SPEC = importlib.util.spec_from_file_location("build_initramfs", REPO / "scripts" / "build_initramfs.py")
assert SPEC is not None and SPEC.loader is not None
bi = importlib.util.module_from_spec(SPEC)
sys.modules["build_initramfs"] = bi
SPEC.loader.exec_module(bi)


def members(archive: bytes) -> dict:
    return {m.name: m for m in bi.read_newc(archive)}


def sample() -> bytes:
    cpio = bi.CpioWriter(mtime=1234)
    cpio.directory("tmp", 0o1777)
    cpio.file("/bin/busybox", b"\x7fELF pretend", 0o755)
    cpio.symlink("bin/sh", "/bin/busybox")
    cpio.node("dev/console", "c", 5, 1)
    cpio.node("dev/null", "c", 1, 3, 0o666)
    cpio.node("dev/vda", "b", 253, 0, 0o660)
    cpio.file("etc/odd-size", b"abcde")  # not a multiple of 4: the next header must still align
    return cpio.to_bytes()


def test_round_trip_keeps_types_modes_and_data():
    archive = sample()
    assert len(archive) % 4 == 0
    m = members(archive)
    assert sorted(m) == ["bin", "bin/busybox", "bin/sh", "dev", "dev/console", "dev/null", "dev/vda", "etc",
                         "etc/odd-size", "tmp"]
    assert m["bin/busybox"].mode == stat.S_IFREG | 0o755 and m["bin/busybox"].data == b"\x7fELF pretend"
    assert m["etc/odd-size"].data == b"abcde"
    assert m["bin/sh"].mode == stat.S_IFLNK | 0o777 and m["bin/sh"].data == b"/bin/busybox"
    assert m["dev/console"].mode == stat.S_IFCHR | 0o600 and m["dev/console"].rdev == (5, 1)
    assert m["dev/null"].mode == stat.S_IFCHR | 0o666 and m["dev/null"].rdev == (1, 3)
    assert m["dev/vda"].mode == stat.S_IFBLK | 0o660 and m["dev/vda"].rdev == (253, 0)
    assert m["tmp"].mode == stat.S_IFDIR | 0o1777
    assert m["bin"].mode == stat.S_IFDIR | 0o755  # made for bin/busybox
    assert all(x.uid == 0 and x.gid == 0 and x.mtime == 1234 for x in m.values())
    assert len({x.ino for x in m.values()}) == len(m)


def test_archive_ends_with_the_trailer_and_reads_through_gzip():
    archive = sample()
    assert b"TRAILER!!!\0" in archive[-128:]
    assert members(gzip.compress(archive)) == members(archive)


def test_paths_are_normalised_and_conflicts_refused():
    cpio = bi.CpioWriter()
    cpio.file("a//b/../c", b"x")
    assert list(members(cpio.to_bytes())) == ["a", "a/c"]
    with pytest.raises(ValueError):
        cpio.file("a", b"not a directory")
    with pytest.raises(ValueError):
        cpio.directory("a/c")
    with pytest.raises(ValueError):
        cpio.node("dev/x", "p", 0, 0)
    with pytest.raises(ValueError):
        cpio.file("/", b"")


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio is not installed (scripts/setup installs it)")
def test_gnu_cpio_lists_what_was_written():
    out = subprocess.run(["cpio", "-t", "-v", "--numeric-uid-gid", "--quiet"], input=sample(), capture_output=True,
                         check=True).stdout.decode()
    lines = {line.split()[-1] if "->" not in line else line.split()[-3]: line for line in out.splitlines()}
    assert set(lines) == {"bin", "bin/busybox", "bin/sh", "dev", "dev/console", "dev/null", "dev/vda", "etc",
                          "etc/odd-size", "tmp"}
    fields = {name: line.split() for name, line in lines.items()}
    assert fields["dev/console"][0] == "crw-------" and fields["dev/console"][4:6] == ["5,", "1"]
    assert fields["dev/null"][0] == "crw-rw-rw-" and fields["dev/null"][4:6] == ["1,", "3"]
    assert fields["dev/vda"][0] == "brw-rw----" and fields["dev/vda"][4:6] == ["253,", "0"]
    assert lines["bin/sh"].startswith("lrwxrwxrwx") and lines["bin/sh"].endswith("-> /bin/busybox")
    assert lines["bin/busybox"].startswith("-rwxr-xr-x")
    assert lines["tmp"].startswith("drwxrwxrwt")
    assert all(line.split()[2:4] == ["0", "0"] for line in lines.values())


# A made-up module tree. `direct` lists only direct dependencies; `full` lists every one, the way
# depmod writes it (the last is loaded first).
DIRECT = """\
kernel/drivers/virtio/virtio_ring.ko.xz:
kernel/drivers/virtio/virtio.ko.xz: kernel/drivers/virtio/virtio_ring.ko.xz
kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/virtio/virtio.ko.xz kernel/drivers/net/net_failover.ko.xz
kernel/drivers/net/net_failover.ko.xz: kernel/net/core/failover.ko.xz
kernel/net/core/failover.ko.xz:
kernel/drivers/char/hw_random/virtio-rng.ko.xz: kernel/drivers/virtio/virtio.ko.xz
kernel/fs/unrelated.ko.xz:
"""
FULL = """\
kernel/drivers/virtio/virtio_ring.ko.xz:
kernel/drivers/virtio/virtio.ko.xz: kernel/drivers/virtio/virtio_ring.ko.xz
kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko.xz kernel/net/core/failover.ko.xz \
kernel/drivers/virtio/virtio.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz
kernel/drivers/net/net_failover.ko.xz: kernel/net/core/failover.ko.xz
kernel/net/core/failover.ko.xz:
kernel/drivers/char/hw_random/virtio-rng.ko.xz: kernel/drivers/virtio/virtio.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz
kernel/fs/unrelated.ko.xz:
"""


def loads_in_order(order):
    names = [bi.module_name(p) for p in order]
    deps = bi.parse_modules_dep(DIRECT)
    for path in order:
        for dep in deps[path]:
            assert names.index(bi.module_name(dep)) < names.index(bi.module_name(path)), (dep, path)
    return names


@pytest.mark.parametrize("text", [DIRECT, FULL], ids=["direct", "full"])
def test_dependencies_resolve_in_load_order(text):
    deps = bi.parse_modules_dep(text)
    names = loads_in_order(bi.resolve_modules(deps, ["virtio_net", "virtio-rng"]))
    assert sorted(names) == ["failover", "net_failover", "virtio", "virtio_net", "virtio_ring", "virtio_rng"]
    assert names.count("virtio") == 1
    assert bi.resolve_modules(deps, ["virtio_ring"]) == ["kernel/drivers/virtio/virtio_ring.ko.xz"]


def test_module_names_and_missing_or_circular_modules():
    assert bi.module_name("kernel/drivers/char/hw_random/virtio-rng.ko.xz") == "virtio_rng"
    assert bi.module_name("a/b.ko") == "b" and bi.module_name("a/b.ko.zst") == "b"
    assert bi.uncompressed_path("kernel/a.ko.xz") == "kernel/a.ko" and bi.uncompressed_path("a.ko") == "a.ko"
    deps = bi.parse_modules_dep(DIRECT)
    with pytest.raises(ValueError, match="no module 'virtio_blk'"):
        bi.resolve_modules(deps, ["virtio_blk"])
    with pytest.raises(ValueError, match="circular"):
        bi.resolve_modules(bi.parse_modules_dep("a.ko: b.ko\nb.ko: a.ko\n"), ["a"])
    with pytest.raises(ValueError, match="does not list"):
        bi.resolve_modules(bi.parse_modules_dep("a.ko: gone.ko\n"), ["a"])


def fake_tree(tmp_path: Path, text: str) -> Path:
    tree = tmp_path / "lib" / "modules" / "6.9.0-test"
    for path in bi.parse_modules_dep(text):
        f = tree / path
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(lzma.compress(f"module {bi.module_name(path)}".encode()))
    (tree / "modules.dep").write_text(text)
    (tree / "modules.builtin").write_text("kernel/drivers/tty/serial/8250/8250.ko\n")
    return tree


def test_modules_are_decompressed_with_a_modules_dep_for_busybox(tmp_path):
    tree = fake_tree(tmp_path, FULL)
    cpio = bi.CpioWriter()
    loaded = bi.add_modules(cpio, tree, "6.9.0-test", ["virtio_net"])
    m = members(cpio.to_bytes())
    base = "lib/modules/6.9.0-test/"
    assert all(p.startswith(base) for p in loaded)
    names = loads_in_order([p[len(base):] + ".xz" for p in loaded])
    assert sorted(names) == ["failover", "net_failover", "virtio", "virtio_net", "virtio_ring"]
    assert m[base + "kernel/drivers/net/virtio_net.ko"].data == b"module virtio_net"
    assert not any(name.endswith(".xz") for name in m)
    assert not any("unrelated" in name or "virtio_rng" in name for name in m)
    dep = bi.parse_modules_dep(m[base + "modules.dep"].data.decode())
    assert set(dep) == {p[len(base):] for p in loaded}
    # Every line lists the module's whole closure, the last entry loaded first.
    net = dep["kernel/drivers/net/virtio_net.ko"]
    assert sorted(net) == sorted(["kernel/net/core/failover.ko", "kernel/drivers/net/net_failover.ko",
                                  "kernel/drivers/virtio/virtio_ring.ko", "kernel/drivers/virtio/virtio.ko"])
    assert net.index("kernel/drivers/virtio/virtio.ko") < net.index("kernel/drivers/virtio/virtio_ring.ko")
    assert net.index("kernel/drivers/net/net_failover.ko") < net.index("kernel/net/core/failover.ko")
    assert m[base + "modules.builtin"].data.startswith(b"kernel/drivers/tty")


def signed(module: bytes, signature: bytes) -> bytes:
    """`module` with a signature appended the way the kernel's sign-file appends one."""
    info = bi.MODULE_SIGNATURE_INFO.pack(0, 0, 2, 0, 0, len(signature))  # id_type 2: PKCS#7
    return module + signature + info + bi.MODULE_SIGNATURE_MARKER


def test_module_signatures_are_stripped():
    body = b"\x7fELF module body ending in ~Module"
    assert bi.strip_signature(signed(body, b"\x30\x82" + bytes(300))) == body
    assert bi.strip_signature(body) == body, "an unsigned module stays as it is"
    with pytest.raises(ValueError, match="signature of 9999 bytes"):
        bi.strip_signature(bytes(10) + bi.MODULE_SIGNATURE_INFO.pack(0, 0, 2, 0, 0, 9999) + bi.MODULE_SIGNATURE_MARKER)


def test_modules_go_into_the_image_unsigned(tmp_path):
    tree = fake_tree(tmp_path, FULL)
    path = tree / "kernel/drivers/virtio/virtio.ko.xz"
    path.write_bytes(lzma.compress(signed(b"module virtio", b"\x30" * 64)))
    cpio = bi.CpioWriter()
    bi.add_modules(cpio, tree, "6.9.0-test", ["virtio"])
    assert members(cpio.to_bytes())["lib/modules/6.9.0-test/kernel/drivers/virtio/virtio.ko"].data == b"module virtio"


def test_a_whole_image_from_a_fake_busybox(tmp_path):
    busybox = tmp_path / "busybox"
    busybox.write_text("#!/bin/sh\nprintf 'bin/busybox\\nbin/sh\\nsbin/modprobe\\nusr/bin/setsid\\nlinuxrc\\n'\n")
    busybox.chmod(0o755)
    init = tmp_path / "init"
    init.write_text("#!/bin/sh\necho hi\n")
    tree = fake_tree(tmp_path, DIRECT)
    archive, loaded = bi.build(busybox, init, tree, None, ["virtio-rng"], mtime=0)
    m = members(archive)
    assert m["init"].mode == stat.S_IFREG | 0o755 and m["init"].data == init.read_bytes()
    assert m["bin/busybox"].mode == stat.S_IFREG | 0o755
    for applet in ("bin/sh", "sbin/modprobe", "usr/bin/setsid"):
        assert m[applet].mode == stat.S_IFLNK | 0o777 and m[applet].data == b"/bin/busybox"
    assert "linuxrc" not in m
    assert m["dev/console"].rdev == (5, 1) and stat.S_ISCHR(m["dev/console"].mode)
    assert m["dev/null"].rdev == (1, 3) and stat.S_ISCHR(m["dev/null"].mode)
    for d in ("proc", "sys", "dev", "tmp", "lib/modules/6.9.0-test"):
        assert stat.S_ISDIR(m[d].mode), d
    assert [bi.module_name(p) for p in loaded] == ["virtio_ring", "virtio", "virtio_rng"]


def test_the_command_line_tool_is_reproducible(tmp_path):
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"not runnable here")  # --list-full fails: the built-in applet list is used
    init = tmp_path / "init"
    init.write_text("#!/bin/sh\n")
    tree = fake_tree(tmp_path, FULL)
    outs = []
    for name in ("a.cpio.gz", "b.cpio.gz"):
        args = ["-o", str(tmp_path / name), "--busybox", str(busybox), "--init", str(init), "--module-dir", str(tree),
                "--modules", "virtio_net,virtio_rng"]
        assert bi.main(args) == 0
        outs.append((tmp_path / name).read_bytes())
    assert outs[0] == outs[1] and outs[0][:2] == b"\x1f\x8b"
    m = members(outs[0])
    assert m["bin/sh"].data == b"/bin/busybox" and "sbin/modprobe" in m
    assert bi.main(["-o", str(tmp_path / "c"), "--busybox", str(busybox), "--init", str(init),
                    "--module-dir", str(tree), "--modules", "nonexistent"]) == 1


def test_the_init_script_prints_the_marker_and_powers_off():
    init = (REPO / "tests" / "linux" / "init").read_text()
    assert init.startswith("#!/bin/sh\n")
    assert 'echo "vmcore: init reached"' in init
    # The readiness line comes after the modules are loaded, right before the shell.
    assert init.index("modprobe") < init.index('echo "vmcore: ready"') < init.index("setsid cttyhack sh")
    assert "setsid cttyhack sh" in init and "poweroff -f" in init


PUBLISHED = REPO / "target" / "linux"


@pytest.mark.skipif(not (PUBLISHED / "initramfs.cpio").exists(), reason="scripts/linux-guest has not run")
def test_the_published_guest():
    version = (PUBLISHED / "version").read_text().strip()
    assert (PUBLISHED / "vmlinuz").read_bytes()[0x202:0x206] == b"HdrS"  # a bzImage's setup header
    assert (PUBLISHED / "modules" / "modules.dep").is_file()
    m = members((PUBLISHED / "initramfs.cpio").read_bytes())
    assert m["init"].data == (REPO / "tests" / "linux" / "init").read_bytes()
    for applet in ("bin/sh", "bin/mount", "bin/uname", "sbin/poweroff", "sbin/modprobe", "bin/cttyhack"):
        assert m[applet].data == b"/bin/busybox", applet
    base = f"lib/modules/{version}/"
    dep = bi.parse_modules_dep(m[base + "modules.dep"].data.decode())
    assert dep and all(base + path in m for path in dep)
    assert all(base + d in m for deps in dep.values() for d in deps)
    assert not [path for path in dep if m[base + path].data.endswith(bi.MODULE_SIGNATURE_MARKER)], "signed modules"
