#!/usr/bin/env bash
# The package scenario: builds the release .deb (dist/build-deb.sh), unpacks it into the lab's
# dom0 (xen-lab.sh build deb:FILE; nothing from target/ goes in), boots once, and checks
# that serve, started by the installed unit's ExecStart with the installed disks.toml given
# a disk, serves the guest, that ExecReload adds a disk, that ExecStop hands the disks over
# and ExecStart again takes them over under a guest's write, that SIGINT detaches them, and
# that the bytes the guest read and wrote are dom0's. About 1.5 minutes of boot.
# Usage (from anywhere): tests/xen-lab/package-run.sh
#        tests/xen-lab/package-run.sh --checks-only LOG   (a boot's log, kept as $OUT/lab.log)
# LAB_RELEASE chooses the release (12 by default); OUT the lab's directory.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${OUT:-${TMPDIR:-/tmp}/xen-disk-lab-pkg}

. "$here/checks-lib.sh"

checks() {
  local timeouts
  timeouts=$(sed -n "s/^LAB: timeout waiting for '\(.*\)'$/\1/p" <<<"$log" | paste -sd ';' -)
  check "dom0: every wait saw its guest line" "${timeouts:-none}" none
  check "installed from the package, not /opt/xen-disk" "$(value 'LAB: pkg' from-package)" yes
  check "the package put the binary, unit and disks.toml in place" \
    "$(value 'LAB: pkg' binary) $(value 'LAB: pkg' unit) $(value 'LAB: pkg' config)" "yes yes yes"
  check "serve started by the unit's ExecStart" \
    "$(sed -n 's/^LAB: pkg exec-start=//p' <<<"$log" | head -1)" "/usr/bin/xen-disk-host serve --config /etc/xen-disk/disks.toml"
  check "xvdb: 32 MiB" "$(value 'GUEST: xvdb' size)" 65536
  check "xvdb: the guest reads dom0's bytes" "$(value 'GUEST: xvdb' md5)" "$(value 'LAB: b' host-md5)"
  check "xvdb: the guest's write reads back" "$(value 'GUEST: xvdb back' md5-pat)" "$(value 'GUEST: xvdb wrote' md5-pat)"
  check "xvdb: and is in dom0's image" "$(value 'LAB: b' host-md5-written)" "$(value 'GUEST: xvdb wrote' md5-pat)"
  check "ctl list (default socket) shows the disk" "$(grep -c '^LAB: ctl .*xvdb' <<<"$log")" 1
  check "ExecReload: exit 0" "$(value 'LAB: reload' exit)" 0
  check "ExecReload: the added disk reaches the guest, read-only" "$(value 'GUEST: xvdc' ro)" 1
  check "ExecReload: the guest reads dom0's bytes" "$(value 'GUEST: xvdc' md5)" "$(value 'LAB: c' host-md5)"
  check "ExecStop: exit 0" "$(value 'LAB: stop' exit)" 0
  check "ExecStop: serve exits 0" "$(value 'LAB: serve' exit)" 0
  check "ExecStop: a hand-over, both disks left connected" \
    "$(value 'LAB: stopped' entries-left) $(value 'LAB: stopped' states)" "yes 4,4,"
  check "ExecStart again: the new serve takes both disks over" "$(value 'LAB: restarted' taken-over)" 2
  check "a write across the restart reads back" \
    "$(value 'GUEST: xvdb across-restart back' md5-pat)" "$(value 'GUEST: xvdb across-restart wrote' md5-pat)"
  check "no I/O error in the guest's kernel log" "$(value 'GUEST:' io-errors)" no
  check "SIGINT: serve exits 0" "$(value 'LAB: serve interrupted' exit)" 0
  check "SIGINT: the guest lets go of both disks" "$(yes_if 'GUEST: xvdb gone') $(yes_if 'GUEST: xvdc gone')" "yes yes"
  check "SIGINT: serve removed its backend entries" "$(value 'LAB: serve' entries-left)" no
  check "read-only disk unchanged" "$(value 'LAB: c' host-md5-after)" "$(value 'LAB: c' host-md5)"
}

[ "${1:-}" != "--checks-only" ] || checks_only "xen-lab package" "${2:-}" "$0 --checks-only LOG"

lab=${XEN_LAB:-$here/xen-lab.sh}
deb=$(bash "$root/dist/build-deb.sh" | grep '/xen-disk_[^/]*\.deb$')
[ -f "$deb" ] || { echo "xen-lab package: dist/build-deb.sh made no xen-disk package" >&2; exit 1; }
OUT=$out bash "$lab" build "deb:$deb" >/dev/null
start=$(date +%s)
log=$(LAB_TIMEOUT=${LAB_TIMEOUT:-900} OUT=$out bash "$lab" run "$here/package-dom0.sh" "$here/package-guest.sh" | tr -d '\r')
boot=$(( $(date +%s) - start ))
echo "$log"
echo "$log" >"$out/lab.log"
checks
echo "xen-lab package: boot took ${boot}s (log: $out/lab.log; --checks-only checks it again)"
summary "xen-lab package"
