#!/bin/sh
# check.sh OUTDIR - boot each multiboot test kernel under QEMU (TCG) with
# qemu-run.sh and compare its console output and exit status with what
# README.md promises.  Run by `make check`; skipped without qemu-system-i386.
# Variable parts (RTC time, addresses, mmap) are matched by regex; the `ap`
# lines of mb-smp are compared as a set (APs print in any order).
set -u
LC_ALL=C
export LC_ALL
out=${1:?usage: check.sh OUTDIR}
here=$(cd "$(dirname "$0")" && pwd)
qemu=${QEMU:-qemu-system-i386}
if ! command -v "$qemu" >/dev/null 2>&1; then
    echo "check.sh: $qemu not found, skipping the QEMU boots"
    exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
passed=0
failed=0

# sort_ap_lines FILE: print FILE with each run of `ap ...` lines sorted.
sort_ap_lines() {
    awk '/^ap / { aps = aps $0 "\n"; next }
         aps != "" { fflush(); printf "%s", aps | "sort"; close("sort"); aps = "" }
         { print }
         END { if (aps != "") { fflush(); printf "%s", aps | "sort"; close("sort") } }' "$1"
}

# check NAME STATUS EXPECTED [sorted] -- KERNEL [QEMU ARGS...]
# EXPECTED: one extended regex per output line, matched against the whole
# line.  With "sorted", runs of `ap` lines in both are sorted first.
check() {
    name=$1 want_status=$2 expected=$3
    shift 3
    sorted=
    if [ "$1" = sorted ]; then sorted=1; shift; fi
    shift                                   # --
    sh "$here/qemu-run.sh" "$@" >"$tmp/out" 2>"$tmp/err"
    status=$?
    printf '%s\n' "$expected" >"$tmp/want"
    if [ -n "$sorted" ]; then
        sort_ap_lines "$tmp/out" >"$tmp/o" && mv "$tmp/o" "$tmp/out"
        sort_ap_lines "$tmp/want" >"$tmp/w" && mv "$tmp/w" "$tmp/want"
    fi
    ok=1
    [ "$status" -eq "$want_status" ] || ok=
    [ "$(wc -l <"$tmp/out")" -eq "$(wc -l <"$tmp/want")" ] || ok=
    if [ -n "$ok" ]; then
        exec 3<"$tmp/want" 4<"$tmp/out"
        while IFS= read -r re <&3 && IFS= read -r line <&4; do
            printf '%s\n' "$line" | grep -Eqx -- "$re" || { ok=; break; }
        done
        exec 3<&- 4<&-
    fi
    if [ -n "$ok" ]; then
        passed=$((passed + 1))
        echo "ok   $name"
    else
        failed=$((failed + 1))
        echo "FAIL $name: status $status (want $want_status), output:"
        sed 's/^/    /' "$tmp/out" "$tmp/err"
        echo "  expected (regexes):"
        sed 's/^/    /' "$tmp/want"
    fi
}

hex='0x[0-9a-f]+'
info_expected="magic ok
flags $hex
mem_lower [0-9]+
mem_upper [0-9]+
cmdline (.* )?hello world
mods 2
mod 0 $hex $hex .*mb-exit\.elf arg1 \.ELF\.\.\.\.
mod 1 $hex $hex .*mb-rtc\.elf \.ELF\.\.\.\.
mmap
mmap $hex $hex [0-9]+
mmap $hex $hex [0-9]+
mmap $hex $hex [0-9]+
mmap $hex $hex [0-9]+
mmap $hex $hex [0-9]+
mmap $hex $hex [0-9]+"
check mb-info 33 "$info_expected" -- "$out/mb-info.elf" \
    -append "hello world" -initrd "$out/mb-exit.elf arg1,$out/mb-rtc.elf"

check mb-exit 133 "exit code 0x42" -- "$out/mb-exit.elf"

check mb-rtc 97 "rtc [0-9]{4}-[01][0-9]-[0-3][0-9] [0-2][0-9]:[0-5][0-9]:[0-5][0-9]
status_b $hex" -- "$out/mb-rtc.elf"

check mb-aout.elf 35 "aout ok
bss ok" -- "$out/mb-aout.elf"
check mb-aout.bin 35 "aout ok
bss ok" -- "$out/mb-aout.bin"

power_found="rsdp rev [0-9]+
(rsdt|xsdt) [0-9]+ entries
fadt rev [0-9]+
smi_cmd $hex
dsdt from (x_)?dsdt
pm1a_cnt $hex
s5 slp_typ [0-9]+"
check "mb-power poweroff" 0 "$power_found
poweroff" -- "$out/mb-power.elf" -append poweroff
check "mb-power kbd-reset" 0 "$power_found
reset through the 8042" -- "$out/mb-power.elf" -append kbd-reset
check "mb-power acpi-reset (q35)" 0 "$power_found
reset register 0xcf9 value $hex" -- "$out/mb-power.elf" -M q35 -append acpi-reset

for n in 1 2 3 4; do
    want="fw_cfg signature QEMU
cpus $n
bsp 0"
    i=1
    while [ "$i" -lt "$n" ]; do
        want="$want
ap $i up"
        i=$((i + 1))
    done
    want="$want
all $n cpus up"
    check "mb-smp -smp $n" $(((0x20 + n) * 2 + 1)) "$want" sorted -- \
        "$out/mb-smp.elf" -smp "$n"
done

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
