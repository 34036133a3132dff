#!/usr/bin/env bash
# Runs the Xen-lab scenarios against a real Xen 4.17 hypervisor and Linux 6.1 guest under QEMU
# (../shared/xen-lab), and checks what the guest saw against what dom0 wrote.
# Needs the lab's packages: KVER=none ../../../shared/xen-lab/xen-lab.sh install (as root).
# Usage: tests/xen-lab/run.sh        (from the repository root)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
lab=${XEN_LAB:-$root/../shared/xen-lab/xen-lab.sh}
out=${OUT:-${TMPDIR:-/tmp}/xen-disk-lab}
cargo build --release --manifest-path "$root/Cargo.toml" >/dev/null
t="$root/target/release"
OUT=$out bash "$lab" build "$t/xen-disk-host" "$t/libfile.so" "$t/libmmap.so" "$t/libdiscard.so" >/dev/null
log=$(OUT=$out bash "$lab" run "$here/dom0-connect.sh" "$here/guest-rw.sh" | tr -d '\r')
echo "$log"
value() { echo "$log" | sed -n "s/^LAB: .*$1=\([^ ]*\).*/\1/p" | head -1; }
fail=0
check() { if [ "$2" = "$3" ] && [ -n "$2" ]; then echo "ok    $1"; else echo "FAIL  $1 ($2 vs $3)"; fail=$((fail + 1)); fi; }
check "guest sees a 256 MiB disk" "$(value size)" 524288
check "guest reads what dom0 wrote" "$(value md5-head | tail -1)" "$(echo "$log" | sed -n 's/^LAB: host-md5-head=//p')"
check "dom0 finds what the guest wrote" "$(value md5-pat)" "$(echo "$log" | sed -n 's/^LAB: host-md5-written=//p')"
check "detached cleanly" "$(echo "$log" | grep -c 'LAB: connect detached')" 1
echo "xen-lab: $((4 - fail)) passed, $fail failed"
[ "$fail" = 0 ]
