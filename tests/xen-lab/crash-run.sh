#!/usr/bin/env bash
# The crash scenario: a real Linux guest writes numbered 4 KiB blocks with O_DIRECT while
# dom0 kills serve with SIGKILL five times and starts it again; each new serve takes the
# connected disk over from its journal. Checks that the guest's writes all verify, its
# kernel log has no I/O error, the xenstore states never left Connected, and prints the
# pause the guest saw. One boot (Xen 4.20 unless LAB_RELEASE says otherwise).
# Usage (from anywhere): tests/xen-lab/crash-run.sh
#        tests/xen-lab/crash-run.sh --checks-only LOG   (a boot's log, kept as $OUT/lab.log)
# OUT is the lab's directory (default /tmp/xen-disk-lab-crash).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${OUT:-${TMPDIR:-/tmp}/xen-disk-lab-crash}
release=${LAB_RELEASE:-13}

. "$here/checks-lib.sh"

checks() {
  local timeouts kills
  timeouts=$(sed -n "s/^LAB: timeout waiting for '\(.*\)'$/\1/p" <<<"$log" | paste -sd ';' -)
  check "dom0: every wait saw its guest line" "${timeouts:-none}" none
  check "the guest got its disk" "$(value 'GUEST: xvdb' size)" 65536
  check "dom0 killed serve 5 times" "$(value 'LAB: kills' n)" 5
  kills=$(grep -c '^LAB: kill n=[0-9]* states=4,4 ' <<<"$log" || true)
  check "both sides stayed Connected at every kill" "$kills" 5
  check "each new serve took the disk over" "$(value 'LAB: serve' taken-over)" 5
  check "no serve refused the journal" "$(value 'LAB: serve' cannot-take)" 0
  check "the writer wrote every block, none failed" \
    "$(value 'GUEST: writer done' blocks) $(has 'GUEST: writer failed' && echo failed || echo none)" "800 none"
  check "every block reads back in the guest (O_DIRECT)" "$(value 'GUEST: verify' md5)" "$(value 'GUEST: verify' want)"
  check "and is in dom0's image" "$(value 'LAB: image' md5)" "$(value 'GUEST: verify' want)"
  check "the guest's kernel log has no I/O error" "$(value 'GUEST: dmesg' io-errors)" 0
}

[ "${1:-}" != "--checks-only" ] || checks_only "xen-lab crash" "${2:-}" "$0 --checks-only LOG"

lab=${XEN_LAB:-$here/xen-lab.sh}
start=$(date +%s)
cargo build --release --manifest-path "$root/Cargo.toml" -p xen-disk-host -p xen-disk-plugin-file >/dev/null
t="$root/target/release"
LAB_RELEASE=$release OUT=$out bash "$lab" build "$t/xen-disk-host" "$t/libfile.so" >/dev/null
boot_start=$(date +%s)
log=$(LAB_RELEASE=$release LAB_TIMEOUT=${LAB_TIMEOUT:-1500} OUT=$out bash "$lab" run "$here/crash-dom0.sh" "$here/crash-guest.sh" | tr -d '\r')
end=$(date +%s)
echo "$log"
echo "$log" >"$out/lab.log"
checks
# Under emulation every write is slow: the five longest are the kills' pauses.
echo "xen-lab crash: the guest's five longest writes (ms): $(sed -n 's/^GUEST: pause block=[0-9]* ms=//p' <<<"$log" | sort -n | tail -5 | paste -sd ' ' -); writes of 0.5 s or more: $(value 'GUEST: writer done' pauses) of 800; serve took over (s after the kill): $(sed -n 's/^LAB: kill .*taken-over-after-s=//p' <<<"$log" | paste -sd ' ' -)"
echo "xen-lab crash: build $((boot_start - start))s, boot $((end - boot_start))s (log: $out/lab.log; --checks-only checks it again)"
summary "xen-lab crash"
