#!/bin/sh
# check.sh OUTDIR - sanity-check the built guests (run by `make check`).
# Flat .bin files: present, non-empty, < 4 KiB, contain their message.
# ELF files: right class and machine, every PT_LOAD at p_paddr >= 0x100000,
# several PT_LOADs incl. one with memsz > filesz, entry == _start, symbols.
set -u
LC_ALL=C
export LC_ALL
out=${1:?usage: check.sh OUTDIR}
fails=0

fail() {
    echo "FAIL: $*" >&2
    fails=$((fails + 1))
}

check_bin() {        # name expected-message
    f=$out/$1.bin
    if [ ! -s "$f" ]; then fail "$f missing or empty"; return; fi
    size=$(wc -c < "$f")
    [ "$size" -lt 4096 ] || fail "$f is $size bytes (limit 4095)"
    grep -qaF "$2" "$f" || fail "$f does not contain \"$2\""
}

check_elf() {        # name class machine expected-message
    f=$out/$1.elf
    if [ ! -s "$f" ]; then fail "$f missing or empty"; return; fi
    hdr=$(readelf -h "$f") || { fail "$f: readelf -h failed"; return; }
    echo "$hdr" | grep -Eq "Class:[[:space:]]+$2\$" || fail "$f is not $2"
    echo "$hdr" | grep -Eq "Machine:[[:space:]]+$3\$" || fail "$f machine is not $3"
    # Type Offset VirtAddr PhysAddr FileSiz MemSiz Flg Align (one line with -W)
    n=0 zfill=0
    loads=$(readelf -lW "$f" | awk '$1 == "LOAD" { print $4, $5, $6 }')
    while read -r paddr filesz memsz; do
        n=$((n + 1))
        [ $((paddr)) -ge $((0x100000)) ] || fail "$f: PT_LOAD at p_paddr $paddr < 0x100000"
        [ $((memsz)) -le $((filesz)) ] || zfill=1
    done <<LOADS
$loads
LOADS
    [ "$n" -ge 2 ] || fail "$f has $n PT_LOAD segments (want >= 2)"
    [ "$zfill" -eq 1 ] || fail "$f has no PT_LOAD with memsz > filesz"
    syms=$(nm "$f") || { fail "$f: nm failed"; return; }
    for s in _start halt_here; do
        echo "$syms" | grep -Eq " T $s\$" || fail "$f lacks global symbol $s"
    done
    entry=$(echo "$hdr" | awk '/Entry point address/ { print $4 }')
    start=$(echo "$syms" | awk '$3 == "_start" { print "0x" $1 }')
    [ -n "$entry" ] && [ -n "$start" ] && [ $((entry)) -eq $((start)) ] ||
        fail "$f: e_entry ($entry) != _start ($start)"
    grep -qaF "$4" "$f" || fail "$f does not contain \"$4\""
}

check_hook_elf() {   # name expected-message label: ELF64, loaded at >= 0x100000, label global
    f=$out/$1.elf
    if [ ! -s "$f" ]; then fail "$f missing or empty"; return; fi
    readelf -h "$f" | grep -Eq "Class:[[:space:]]+ELF64\$" || fail "$f is not ELF64"
    for paddr in $(readelf -lW "$f" | awk '$1 == "LOAD" { print $4 }'); do
        [ $((paddr)) -ge $((0x100000)) ] || fail "$f: PT_LOAD at p_paddr $paddr < 0x100000"
    done
    nm "$f" | grep -Eq " T $3\$" || fail "$f lacks global symbol $3"
    grep -qaF "$2" "$f" || fail "$f does not contain \"$2\""
}

check_bin hello-real   "hello from real mode"
check_bin hello-prot   "hello from protected mode"
check_bin paging32     "hello through 32-bit paging"
check_bin pae          "hello through PAE paging"
check_bin hello-long   "hello from long mode"
check_bin debug-exit   "exiting with 0x31"
check_bin triple-fault "faulting"
check_bin spin         "spinning"
check_bin echo         "ready"
check_bin ports        "unhandled read gave ff"
check_bin demo         "Hello from a vmcore guest"
check_bin bench-real   "vmcore bench"
check_bin bench-ports  "go"
check_bin bench-steps  "go"
check_bin bench-cpuid  "go"
check_elf hello-prot ELF32 "Intel 80386"            "hello from elf32"
check_elf hello-long ELF64 "Advanced Micro Devices X86-64" "hello from elf64"
check_hook_elf cpuid "cpuid 40000100:" cpuid_site
check_hook_elf cr    "cr8="            cr8_write
check_hook_elf msr   "msr c0ffee="     rdmsr_site

if [ "$fails" -ne 0 ]; then
    echo "guest check: $fails problem(s)" >&2
    exit 1
fi
echo "guest check: all guests OK"
