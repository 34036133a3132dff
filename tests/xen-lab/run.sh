#!/usr/bin/env bash
# Runs the Xen-lab scenarios against a real Xen hypervisor and a Linux PV guest's xen-blkfront
# under QEMU (xen-lab.sh beside this file), one boot, and checks what the guest saw against
# what dom0 wrote. See dom0-scenarios.sh for the list. LAB_RELEASE picks the release (12: Xen
# 4.17 and Linux 6.1, the default; 13: Xen 4.20 and Linux 6.12), as for xen-lab.sh.
# Needs the lab's packages: tests/xen-lab/xen-lab.sh install (as root).
# Usage: tests/xen-lab/run.sh [--reference]   (from the repository root)
#        tests/xen-lab/run.sh --checks-only LOG
#   --reference    also boot Linux's in-kernel blkback serving the same guest (speed oracle)
#   --checks-only  no build, no boot: run the checks on a saved log (each boot's is kept as
#                  $OUT/lab.log, default /tmp/xen-disk-lab/lab.log)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${OUT:-${TMPDIR:-/tmp}/xen-disk-lab}

. "$here/checks-lib.sh"
# MB/s of the guest's cold read of $1 (coldread.sh prints the line only if dd read it all).
speed() {
  local b; b=$(value "GUEST: $1 dd-read" bytes)
  [ -n "$b" ] || { echo "(read failed)"; return; }
  awk -v b="$b" -v s="$(value "GUEST: $1 dd-read" start)" -v e="$(value "GUEST: $1 dd-read" end)" \
    'BEGIN { if (e > s) printf "%.1f", b / 1e6 / (e - s) }'
}

checks() {
  local timeouts before after
  # A wait that timed out is a failed step, whatever the checks below make of what followed.
  timeouts=$(sed -n "s/^LAB: timeout waiting for '\(.*\)'$/\1/p" <<<"$log" | paste -sd ';' -)
  check "dom0: every wait saw its guest line" "${timeouts:-none}" none
  check "file: guest sees 256 MiB" "$(value 'GUEST: xvdb size' size)" 524288
  check "file: guest reads what dom0 wrote" "$(value 'GUEST: xvdb md5-head' md5-head)" "$(value 'LAB: b host-md5-head' host-md5-head)"
  check "file: dom0 finds what the guest wrote" "$(value 'GUEST: xvdb md5-pat' md5-pat)" "$(value 'LAB: b host-md5-written' host-md5-written)"
  check "file: blkdiscard succeeds in the guest" "$(yes_if 'GUEST: xvdb discarded')" yes
  check "file: idle rings parked (ctl stats parks >= 1)" "$([ "$(value 'LAB: b parks' parks)" -ge 1 ] 2>/dev/null && echo yes)" yes
  check "file: parked rings woke and read the pattern back" "$(value 'GUEST: xvdb after-park' md5-pat)" "$(value 'GUEST: xvdb md5-pat' md5-pat)"
  before=$(value 'LAB: b du-before' du-before); after=$(value 'LAB: b du-after' du-after)
  check "file: discard punched holes (du shrank by >= 60 MiB)" "$(case "$before$after" in '' | *[!0-9]*) echo "no: '$before' -> '$after'" ;;
    *) [ $((before - after)) -ge 61440 ] && echo yes || echo "no: $before -> $after KiB" ;; esac)" yes
  check "file: detached cleanly" "$(value 'LAB: b exit' exit)" 0
  check "mmap shared=false: guest sees its own writes" "$(yes_if 'GUEST: xvdc own writes visible')" yes
  check "mmap shared=false: image unchanged" "$(value 'LAB: c sha-after' sha-after)" "$(value 'LAB: c sha-before' sha-before)"
  check "discard: guest reads 256 MiB" "$(value 'GUEST: xvdd dd-read' bytes)" 268435456
  check "read-only: guest sees ro=1" "$(value 'GUEST: xvde size' ro)" 1
  check "read-only: guest's write refused" "$(yes_if 'GUEST: xvde write refused')" yes
  check "read-only: data readable" "$(value 'GUEST: xvde md5-head' md5-head)" "$(value 'LAB: e host-md5-head' host-md5-head)"
  check "read-only: image unchanged" "$(value 'LAB: e host-md5-after' host-md5-after)" "$(value 'LAB: e host-md5-head' host-md5-head)"
  check "4096 sectors: guest's logical block size" "$(value 'GUEST: xvdf size' lbs)" 4096
  check "4096 sectors: data round-trips in the guest" "$(value 'GUEST: xvdf md5-pat' back)" "$(value 'GUEST: xvdf md5-pat' md5-pat)"
  check "4096 sectors: and lands in the image" "$(value 'LAB: f host-md5-written' host-md5-written)" "$(value 'GUEST: xvdf md5-pat' md5-pat)"
  check "filesystem: guest lets go at detach" "$(yes_if 'GUEST: xvdg gone before-reattach')" yes
  check "filesystem: intact after reattach" "$(yes_if 'GUEST: xvdg fs intact')" yes
  check "second guest: blkfront asks for 2 queues" "$(value 'LAB: h fe' queues)" 2
  check "second guest: order-4 ring" "$(value 'LAB: h fe' order)" 4
  check "second guest: persistent grants off" "$(value 'LAB: h fe' persistent)" 0
  check "second guest: 2 hardware queues" "$(value 'GUEST: xvdh size' queues)" 2
  check "second guest: reads what dom0 wrote" "$(value 'GUEST: xvdh md5' md5)" "$(value 'LAB: h host-md5' host-md5)"
  check "second guest: ctl stats sees its reads" "$(line 'LAB: h stats' | grep -c 'reads [1-9][0-9]* (')" 1
  check "guest destroyed and created again: serve attaches the disk to the new domain" "$(yes_if 'GUEST: xvdh after reboot')" yes
  check "guest destroyed and created again: its write is there" "$(value 'GUEST: xvdh after reboot' md5-pat)" "$(value 'GUEST: xvdh wrote' md5-pat)"
  check "second serve: SIGTERM exits 0" "$(value 'LAB: h serve exit' exit)" 0
  check "serve: configured disk's data" "$(value 'GUEST: xvdi md5' md5)" "$(value 'LAB: i host-md5' host-md5)"
  check "serve: toolstack device's data" "$(value 'GUEST: xvdj md5' md5)" "$(value 'LAB: j host-md5' host-md5)"
  check "serve: keeps running after xl destroy" "$(value 'LAB: serve alive-after-destroy' alive-after-destroy)" yes
  check "serve: removed its entries of the destroyed guest" "$(value 'LAB: serve static-entries-left' static-entries-left)" no
  check "serve: SIGTERM exits 0" "$(value 'LAB: serve exit' exit)" 0
}

[ "${1:-}" != "--checks-only" ] || checks_only "xen-lab" "${2:-}" "$0 --checks-only LOG (a lab run's log, e.g. $out/lab.log)"

lab=${XEN_LAB:-$here/xen-lab.sh}
cargo build --release --manifest-path "$root/Cargo.toml" >/dev/null
t="$root/target/release"
# Kernel modules come from the release's own kernel (LAB_RELEASE), never from this machine's:
# loop and xen-blkback for --reference in dom0, ext2 (the ext4 module) and the crc32c it asks
# for at mount time in the guest (the lab ships blkfront only).
OUT=$out bash "$lab" build "$t/xen-disk-host" "$t/libfile.so" "$t/libmmap.so" "$t/libdiscard.so" \
  module:loop module:xen-blkback guest-module:crc32c_generic guest-module:ext4 >/dev/null
# blkfront parameters from the guest's command line (the second guest asks for 2 queues...).
cp "$here/blkfront-load.sh" "$out/domU/blkfront-load"
# The checked cold read both guest scripts use.
cp "$here/coldread.sh" "$out/domU/coldread.sh"
sed -i 's|^insmod /xen-blkfront.ko$|/blkfront-load|' "$out/domU/init"
grep -q '^/blkfront-load$' "$out/domU/init" || { echo "xen-lab: the lab's guest init changed; cannot pass blkfront parameters"; exit 1; }

start=$(date +%s)
log=$(LAB_TIMEOUT=${LAB_TIMEOUT:-1200} OUT=$out bash "$lab" run "$here/dom0-scenarios.sh" "$here/guest-scenarios.sh" | tr -d '\r')
boot=$(( $(date +%s) - start ))
echo "$log"
echo "$log" >"$out/lab.log"
checks
echo "xen-lab: release ${LAB_RELEASE:-12}: boot with all scenarios took ${boot}s (log: $out/lab.log; run.sh --checks-only checks it again)"
echo "xen-lab: cold dd bs=1M read in the guest: file $(speed xvdb) MB/s, mmap $(speed xvdc) MB/s, discard $(speed xvdd) MB/s (256 MiB each), file to the second guest (2 queues, order 4, no persistent grants; 64 MiB) $(speed xvdh) MB/s"

if [ "${1:-}" = "--reference" ]; then
  start=$(date +%s)
  ref=$(OUT=$out bash "$lab" run "$(dirname "$lab")/reference-kernel-blkback.sh" "$here/guest-reference.sh" | tr -d '\r')
  echo "$ref" | grep -E 'GUEST: |LAB: be' || true
  # The reference's dom0 script relays its guest's lines as `LAB: GUEST: ...`.
  echo "xen-lab: kernel blkback (loop device): $(log=$(sed 's/^LAB: GUEST: /GUEST: /' <<<"$ref") speed xvda) MB/s (boot $(( $(date +%s) - start ))s)"
fi

summary "xen-lab"
