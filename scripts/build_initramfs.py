#!/usr/bin/env python3
"""Builds a gzip-compressed initramfs (a newc cpio archive) for the Linux test guest.

Everything is written straight into the archive, so no root privileges are needed: device nodes
such as /dev/console exist only as archive entries owned by uid/gid 0, never on the host. The
archive holds a static busybox with a symlink per applet, the init script as /init, and, with
``--modules``, the named kernel modules with everything they depend on (from the module tree's
modules.dep), decompressed so that busybox's insmod/modprobe can load them and stripped of their
signatures (see strip_signature), and a modules.dep for busybox's modprobe.

    build_initramfs.py -o initramfs.cpio.gz --busybox root/bin/busybox --init tests/linux/init \\
        --module-dir root/lib/modules/6.1.0-56-cloud-amd64 --modules virtio_pci,virtio_blk

The output is reproducible: entries are sorted, inode numbers assigned in order, every mtime is
``--mtime`` (default $SOURCE_DATE_EPOCH or 0) and the gzip header carries no time stamp.
"""

from __future__ import annotations

import argparse
import gzip
import lzma
import os
import posixpath
import shutil
import stat
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"
# Suffixes Debian and other distributions use for kernel modules, longest first.
MODULE_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz", ".ko")

# Used when `busybox --list-full` cannot be run on this host (for instance a foreign
# architecture): what the init script and the tests need, and a little more.
FALLBACK_APPLETS = (
    "bin/sh bin/ash bin/cat bin/dmesg bin/echo bin/grep bin/ls bin/mkdir bin/mount bin/umount "
    "bin/sleep bin/sync bin/uname bin/ps bin/rm bin/cp bin/mv bin/ln bin/true bin/false "
    "sbin/insmod sbin/modprobe sbin/lsmod sbin/rmmod sbin/poweroff sbin/reboot sbin/halt "
    "usr/bin/setsid usr/bin/head usr/bin/tail usr/bin/wc usr/bin/nproc usr/bin/env "
    "bin/cttyhack"
).split()


@dataclass
class Entry:
    name: str  # without a leading slash, as the kernel expects
    mode: int  # file type and permission bits
    data: bytes = b""
    rdev: Tuple[int, int] = (0, 0)


class CpioWriter:
    """Collects entries and writes them as a newc ("070701") cpio archive.

    Parent directories are added (0755) when missing; adding a path twice replaces the first
    entry, except that re-adding an existing directory keeps it.
    """

    def __init__(self, mtime: int = 0) -> None:
        self.mtime = mtime
        self.entries: Dict[str, Entry] = {}

    @staticmethod
    def _clean(path: str) -> str:
        name = posixpath.normpath("/" + path).lstrip("/")
        if not name or name == ".":
            raise ValueError(f"not a path inside the archive: {path!r}")
        return name

    def _parents(self, name: str) -> None:
        parent = posixpath.dirname(name)
        if parent and parent not in self.entries:
            self.directory(parent)

    def _add(self, entry: Entry) -> None:
        self._parents(entry.name)
        old = self.entries.get(entry.name)
        if old is not None and stat.S_ISDIR(old.mode) and not stat.S_ISDIR(entry.mode):
            raise ValueError(f"{entry.name} is already a directory in the archive")
        self.entries[entry.name] = entry

    def directory(self, path: str, mode: int = 0o755) -> None:
        name = self._clean(path)
        old = self.entries.get(name)
        if old is not None:
            if not stat.S_ISDIR(old.mode):
                raise ValueError(f"{name} is already a non-directory in the archive")
            return
        self._add(Entry(name, stat.S_IFDIR | mode))

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._add(Entry(self._clean(path), stat.S_IFREG | mode, data))

    def symlink(self, path: str, target: str) -> None:
        self._add(Entry(self._clean(path), stat.S_IFLNK | 0o777, target.encode()))

    def node(self, path: str, kind: str, major: int, minor: int, mode: int = 0o600) -> None:
        """A character ("c") or block ("b") device node."""
        types = {"c": stat.S_IFCHR, "b": stat.S_IFBLK}
        if kind not in types:
            raise ValueError(f"device kind must be 'c' or 'b', not {kind!r}")
        self._add(Entry(self._clean(path), types[kind] | mode, rdev=(major, minor)))

    def to_bytes(self) -> bytes:
        out = bytearray()
        # Sorted, so every directory comes before what it holds and the output is reproducible.
        for ino, name in enumerate(sorted(self.entries), start=1):
            e = self.entries[name]
            nlink = 2 if stat.S_ISDIR(e.mode) else 1
            _write_record(out, name, ino, e.mode, nlink, self.mtime, e.data, e.rdev)
        _write_record(out, TRAILER, 0, 0, 1, 0, b"", (0, 0))
        return bytes(out)


def _pad4(out: bytearray) -> None:
    out += b"\0" * (-len(out) % 4)


def _write_record(out: bytearray, name: str, ino: int, mode: int, nlink: int, mtime: int,
                  data: bytes, rdev: Tuple[int, int]) -> None:
    encoded = name.encode() + b"\0"
    # ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
    fields = (ino, mode, 0, 0, nlink, mtime, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
    out += NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)
    out += encoded
    _pad4(out)
    out += data
    _pad4(out)


@dataclass
class Member:
    """An entry read back from a newc archive."""

    name: str
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    mtime: int
    data: bytes
    rdev: Tuple[int, int]


def read_newc(archive: bytes) -> Iterator[Member]:
    """The entries of a newc cpio archive (gzip-compressed or not), up to the trailer."""
    if archive[:2] == b"\x1f\x8b":
        archive = gzip.decompress(archive)
    pos = 0
    while True:
        header = archive[pos:pos + 110]
        if len(header) < 110 or header[:6] != NEWC_MAGIC:
            raise ValueError(f"no newc header at offset {pos}")
        f = [int(header[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        pos += 110
        name = archive[pos:pos + namesize - 1].decode()
        pos += namesize + (-(110 + namesize) % 4)
        data = archive[pos:pos + filesize]
        pos += filesize + (-filesize % 4)
        if name == TRAILER:
            return
        yield Member(name, f[0], f[1], f[2], f[3], f[4], f[5], data, (f[9], f[10]))


# ---------------------------------------------------------------------------------------------
# Kernel modules

def module_name(path: str) -> str:
    """The name the kernel and modprobe know a module file by: kernel/a/virtio-rng.ko.xz ->
    virtio_rng."""
    base = posixpath.basename(path)
    for suffix in MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[:-len(suffix)]
            break
    return base.replace("-", "_")


def uncompressed_path(path: str) -> str:
    for suffix in MODULE_SUFFIXES[:-1]:
        if path.endswith(suffix):
            return path[:-len(suffix)] + ".ko"
    return path


def parse_modules_dep(text: str) -> Dict[str, List[str]]:
    """modules.dep as {module path: [paths it depends on]}, paths relative to the module tree."""
    deps: Dict[str, List[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or ":" not in line:
            continue
        path, _, rest = line.partition(":")
        deps[path.strip()] = rest.split()
    return deps


def resolve_modules(deps: Dict[str, List[str]], names: Iterable[str]) -> List[str]:
    """The module paths needed to load the named modules, in an order that loads every module
    after all of its dependencies. modules.dep may list every dependency of a module (as depmod
    writes it) or only the direct ones: both give the same result."""
    by_name = {module_name(p): p for p in deps}
    order: List[str] = []
    state: Dict[str, str] = {}

    def visit(path: str, chain: Tuple[str, ...]) -> None:
        if state.get(path) == "done":
            return
        if state.get(path) == "visiting":
            raise ValueError("circular module dependency: " + " -> ".join(chain + (path,)))
        if path not in deps:
            raise ValueError(f"{chain[-1] if chain else '?'} depends on {path}, which modules.dep does not list")
        state[path] = "visiting"
        for dep in deps[path]:
            visit(dep, chain + (path,))
        state[path] = "done"
        order.append(path)

    for name in names:
        key = module_name(name.strip())
        if key not in by_name:
            raise ValueError(f"no module {name!r} in modules.dep (built in, or not in this kernel?)")
        visit(by_name[key], ())
    return order


def closure(deps: Dict[str, List[str]], path: str, load_order: Sequence[str]) -> List[str]:
    """Everything `path` needs, listed as depmod does: the last one is loaded first."""
    needed = set()
    stack = list(deps[path])
    while stack:
        p = stack.pop()
        if p not in needed:
            needed.add(p)
            stack.extend(deps[p])
    return [p for p in reversed(load_order) if p in needed]


def decompress_module(path: Path) -> bytes:
    data = path.read_bytes()
    name = path.name
    if name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if name.endswith(".ko.zst"):
        zstd = shutil.which("zstd")
        if zstd is None:
            raise RuntimeError(f"{path} is zstd-compressed and the zstd tool is not installed")
        return subprocess.run([zstd, "-dc", str(path)], check=True, capture_output=True).stdout
    return data


MODULE_SIGNATURE_MARKER = b"~Module signature appended~\n"
MODULE_SIGNATURE_INFO = struct.Struct(">BBBBB3xI")  # algo, hash, id_type, signer_len, key_id_len, sig_len


def strip_signature(module: bytes) -> bytes:
    """A kernel module without the signature Debian appends (the module proper, then the
    PKCS#7 signature, a struct module_signature and the marker string). The guest's kernel has
    no key to check it with, yet it still hashes the whole module with SHA-256 first: where
    guest kernel code runs in KVM's instruction emulator that took 20-50 s a module (the boot
    log's soft-lockup reports sat in pkcs7_digest). Unsigned, a module loads at once and taints
    the kernel, as a signed one with an unknown key already did."""
    if not module.endswith(MODULE_SIGNATURE_MARKER):
        return module
    end = len(module) - len(MODULE_SIGNATURE_MARKER)
    info_start = end - MODULE_SIGNATURE_INFO.size
    if info_start < 0:
        raise ValueError("a module signature marker without its signature information")
    _, _, _, signer_len, key_id_len, sig_len = MODULE_SIGNATURE_INFO.unpack_from(module, info_start)
    start = info_start - sig_len - signer_len - key_id_len
    if start < 0:
        raise ValueError(f"a module signature of {sig_len} bytes in a {len(module)}-byte module")
    return module[:start]


def add_modules(cpio: CpioWriter, module_dir: Path, version: str, names: Sequence[str]) -> List[str]:
    """Copies the named modules and their dependencies into lib/modules/<version>/, with a
    modules.dep for busybox modprobe. Returns the archive paths in load order."""
    dep_file = module_dir / "modules.dep"
    if not dep_file.is_file():
        raise RuntimeError(f"{dep_file} is missing (run depmod -b on the extracted kernel)")
    deps = parse_modules_dep(dep_file.read_text())
    order = resolve_modules(deps, names)
    base = f"lib/modules/{version}"
    lines = []
    for path in order:
        target = uncompressed_path(path)
        cpio.file(f"{base}/{target}", strip_signature(decompress_module(module_dir / path)))
        needs = [uncompressed_path(p) for p in closure(deps, path, order)]
        lines.append(f"{target}: {' '.join(needs)}".rstrip())
    cpio.file(f"{base}/modules.dep", ("\n".join(lines) + "\n").encode() if lines else b"")
    for extra in ("modules.builtin", "modules.order"):
        if (module_dir / extra).is_file():
            cpio.file(f"{base}/{extra}", (module_dir / extra).read_bytes())
    return [f"{base}/{uncompressed_path(p)}" for p in order]


# ---------------------------------------------------------------------------------------------
# The image

def busybox_applets(busybox: Path) -> List[str]:
    """Where each applet belongs (bin/sh, sbin/modprobe, usr/bin/...), as busybox itself says."""
    try:
        out = subprocess.run([str(busybox), "--list-full"], check=True, capture_output=True, text=True,
                             timeout=10).stdout
        applets = [line.strip() for line in out.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
        applets = []
    return applets or list(FALLBACK_APPLETS)


def build(busybox: Path, init: Path, module_dir: Optional[Path] = None, version: Optional[str] = None,
          modules: Sequence[str] = (), mtime: int = 0) -> Tuple[bytes, List[str]]:
    """The uncompressed archive, and the module paths it holds in load order."""
    cpio = CpioWriter(mtime=mtime)
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "run", "root", "mnt"):
        cpio.directory(d)
    cpio.directory("tmp", 0o1777)
    # The kernel opens /dev/console for init before anything is mounted; the rest are there
    # until init mounts devtmpfs over /dev.
    cpio.node("dev/console", "c", 5, 1, 0o600)
    cpio.node("dev/null", "c", 1, 3, 0o666)
    cpio.node("dev/tty", "c", 5, 0, 0o666)
    cpio.node("dev/ttyS0", "c", 4, 64, 0o660)
    cpio.node("dev/kmsg", "c", 1, 11, 0o644)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in busybox_applets(busybox):
        name = applet.lstrip("/")
        if name != "bin/busybox" and name != "linuxrc":
            cpio.symlink(name, "/bin/busybox")
    cpio.file("init", init.read_bytes(), 0o755)
    cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    cpio.file("etc/group", b"root:x:0:\n")
    loaded: List[str] = []
    if module_dir is not None:
        version = version or module_dir.resolve().name
        cpio.directory(f"lib/modules/{version}")
        if modules:
            loaded = add_modules(cpio, module_dir, version, modules)
    return cpio.to_bytes(), loaded


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", required=True, type=Path, help="the .cpio.gz to write")
    parser.add_argument("--busybox", required=True, type=Path, help="a static busybox binary")
    parser.add_argument("--init", required=True, type=Path, help="the script to install as /init")
    parser.add_argument("--module-dir", type=Path, help="a kernel's /lib/modules/<version> tree (with modules.dep)")
    parser.add_argument("--kernel-version", help="uname -r of the kernel (default: the module tree's name)")
    parser.add_argument("--modules", default="", help="comma-separated modules to include with their dependencies")
    parser.add_argument("--mtime", type=int, default=int(os.environ.get("SOURCE_DATE_EPOCH", "0")),
                        help="the time stamp of every entry (default $SOURCE_DATE_EPOCH or 0)")
    parser.add_argument("--no-gzip", action="store_true", help="write the cpio archive uncompressed")
    args = parser.parse_args(argv)

    names = [n.strip() for n in args.modules.split(",") if n.strip()]
    if names and args.module_dir is None:
        parser.error("--modules needs --module-dir")
    try:
        archive, loaded = build(args.busybox, args.init, args.module_dir, args.kernel_version, names, args.mtime)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"build_initramfs: {e}", file=sys.stderr)
        return 1
    data = archive if args.no_gzip else gzip.compress(archive, compresslevel=9, mtime=0)
    tmp = args.output.with_name(args.output.name + ".tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(data)
    tmp.replace(args.output)
    print(f"{args.output}: {len(data)} bytes ({len(archive)} uncompressed), {len(loaded)} module(s)"
          + (": " + " ".join(module_name(p) for p in loaded) if loaded else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
