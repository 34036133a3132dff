#!/usr/bin/env bash
# The live-backup scenario: a real Linux guest writes numbered 4 KiB blocks with O_DIRECT
# while dom0 backs its disk up with `ctl snapshot`, nbdcopy and `ctl commit`, then again
# incrementally from the dirty bitmap (nbdinfo --map, qemu-img). Checks that each backup
# equals the frozen disk byte for byte, that the bitmap marks exactly the blocks written
# between the snapshots, that the first backup with those blocks equals the second, and that
# after the commits the guest reads back every block it wrote, with no I/O error in its
# kernel log. One boot (Xen 4.20 unless LAB_RELEASE says otherwise).
# Usage (from anywhere): tests/xen-lab/backup-run.sh
#        tests/xen-lab/backup-run.sh --checks-only LOG   (a boot's log, kept as $OUT/lab.log)
# OUT is the lab's directory (default /tmp/xen-disk-lab-backup).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${OUT:-${TMPDIR:-/tmp}/xen-disk-lab-backup}
release=${LAB_RELEASE:-13}

. "$here/checks-lib.sh"

checks() {
  local timeouts c1 c2 first end k
  timeouts=$(sed -n "s/^LAB: timeout waiting for '\(.*\)'$/\1/p" <<<"$log" | paste -sd ';' -)
  check "dom0: every wait saw its guest line" "${timeouts:-none}" none
  check "the guest got its disk" "$(value 'GUEST: xvdb' size)" 65536
  check "snapshot s1: frozen, exported, the disk served by cow over file" \
    "$(value 'LAB: snapshot1' rc) $(matches 'LAB: ctl s1: .* snapshot s1 frozen .*exported read-only' && echo said) $(value 'LAB: snapshot1' stack)" \
    "0 said cow_over_file"
  check "backup 1 (nbdcopy) equals the frozen image, byte for byte" \
    "$(value 'LAB: backup1' rc) $(value 'LAB: backup1' copy) $(value 'LAB: backup1' base-after)" \
    "0 $(value 'LAB: backup1' base) $(value 'LAB: backup1' base)"
  c1=$(value 'LAB: backup1-blocks' cut)
  check "backup 1 holds the guest's first blocks and the original bytes after them" \
    "$(above "$c1" 0) $(value 'LAB: backup1-blocks' content)" "yes ok"
  check "the guest wrote while backup 1 was copied" "$(above "$(value 'LAB: backup1' progress)" "$c1")" yes
  check "commit 1: the disk served by file again, the export closed" \
    "$(value 'LAB: commit1' rc) $(matches 'LAB: ctl commit1: .* snapshot s1 committed' && echo said) $(value 'LAB: commit1' stack) $(value 'LAB: commit1' export)" \
    "0 said file gone"
  check "snapshot s2: frozen, with the blocks written since s1 as qemu:dirty-bitmap:s1" \
    "$(value 'LAB: snapshot2' rc) $(matches 'LAB: ctl s2: .* snapshot s2 frozen .*qemu:dirty-bitmap:s1' && echo said) $(value 'LAB: snapshot2' stack)" \
    "0 said cow_over_file"
  check "backup 2 (nbdcopy) equals the frozen image, byte for byte" \
    "$(value 'LAB: backup2' rc) $(value 'LAB: backup2' copy) $(value 'LAB: backup2' base-after)" \
    "0 $(value 'LAB: backup2' base) $(value 'LAB: backup2' base)"
  c2=$(value 'LAB: backup2-blocks' cut)
  check "backup 2 holds the guest's first blocks and the original bytes after them" \
    "$(above "$c2" "$c1") $(value 'LAB: backup2-blocks' content)" "yes ok"
  check "the dirty bitmap (nbdinfo --map) covers every block written between the snapshots" \
    "$(value 'LAB: dirty' rc) $(above "$(value 'LAB: dirty' want-covered)" 0) $(value 'LAB: dirty' covered)" \
    "0 yes $(value 'LAB: dirty' want-covered)"
  first=$(value 'LAB: dirty' first) end=$(value 'LAB: dirty' end)
  check "and marks no other 64 KiB block" \
    "$(value 'LAB: dirty' ranges) $first $end $(value 'LAB: dirty' bytes)" \
    "1 $(value 'LAB: dirty' want-first) $(value 'LAB: dirty' want-end) $(( ${end:-0} - ${first:-0} ))"
  check "backup 1 + the dirty blocks (qemu-img from the export) equals backup 2" \
    "$(value 'LAB: incremental' failed) $(value 'LAB: incremental' copy)" "0 $(value 'LAB: backup2' copy)"
  check "commit 2: the disk served by file again, the export closed" \
    "$(value 'LAB: commit2' rc) $(matches 'LAB: ctl commit2: .* snapshot s2 committed' && echo said) $(value 'LAB: commit2' stack) $(value 'LAB: commit2' export)" \
    "0 said file gone"
  k=$(value 'GUEST: writer done' blocks)
  check "the guest wrote after commit 2 and stopped on dom0's signal" \
    "$(above "$k" "$(value 'LAB: after-commit2' progress)") $(value 'GUEST: writer done' by)" "yes stop"
  check "every block the guest wrote reads back in the guest (O_DIRECT)" \
    "$(value 'GUEST: verify' md5)" "$(value 'GUEST: verify' want)"
  check "and is in dom0's image, the original bytes after it" \
    "$(value 'LAB: image' blocks) $(value 'LAB: image' md5) $(value 'LAB: image' rest)" \
    "$k $(value 'GUEST: verify' want) $(value 'LAB: image' want-rest)"
  check "the guest's kernel log has no I/O error" "$(value 'GUEST: dmesg' io-errors)" 0
  check "serve logged no error" "$(value 'LAB: serve' errors)" 0
}

[ "${1:-}" != "--checks-only" ] || checks_only "xen-lab backup" "${2:-}" "$0 --checks-only LOG"

lab=${XEN_LAB:-$here/xen-lab.sh}
start=$(date +%s)
cargo build --release --manifest-path "$root/Cargo.toml" -p xen-disk-host -p xen-disk-plugin-file -p xen-disk-cow >/dev/null
t="$root/target/release"
tools=
for p in nbdcopy nbdinfo qemu-img; do
  tools="$tools $(command -v $p)" || { echo "$p is missing (packages libnbd-bin, qemu-utils)" >&2; exit 1; }
done
# shellcheck disable=SC2086
LAB_RELEASE=$release OUT=$out bash "$lab" build "$t/xen-disk-host" "$t/libfile.so" "$t/libcow.so" $tools >/dev/null
boot_start=$(date +%s)
log=$(LAB_RELEASE=$release LAB_TIMEOUT=${LAB_TIMEOUT:-1500} OUT=$out bash "$lab" run "$here/backup-dom0.sh" "$here/backup-guest.sh" | tr -d '\r')
end=$(date +%s)
echo "$log"
echo "$log" >"$out/lab.log"
checks
echo "xen-lab backup: 32 MiB disk; snapshot pauses (us): $(sed -n 's/^LAB: ctl s[12]: .*(paused \([0-9]*\) us).*/\1/p' <<<"$log" | paste -sd ' ' -); full copies (s): $(value 'LAB: backup1' s) $(value 'LAB: backup2' s); incremental: $(value 'LAB: dirty' bytes) bytes in $(value 'LAB: dirty' ranges) range(s), $(value 'LAB: incremental' s) s; commits (s): $(value 'LAB: commit1' s) $(value 'LAB: commit2' s), their pauses (us): $(sed -n 's/^LAB: ctl commit[12]: .* during a \([0-9]*\) us pause.*/\1/p' <<<"$log" | paste -sd ' ' -); guest blocks: $(value 'LAB: backup1-blocks' cut) at s1, $(value 'LAB: backup2-blocks' cut) at s2, $(value 'GUEST: writer done' blocks) in all"
echo "xen-lab backup: build $((boot_start - start))s, boot $((end - boot_start))s (log: $out/lab.log; --checks-only checks it again)"
summary "xen-lab backup"
