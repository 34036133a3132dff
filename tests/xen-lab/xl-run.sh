#!/usr/bin/env bash
# `xl` drives `serve` on Xen 4.20 (LAB_RELEASE=13, Linux 6.12): builds the release binary and
# the plugins the scenarios use, boots the lab once with xl-dom0.sh and xl-guest.sh, and
# checks what the guest read and wrote against what dom0 holds (qemu-img compare and check
# for the vhd and qcow2 images).
# Usage: tests/xen-lab/xl-run.sh                    (from the repository root)
#        tests/xen-lab/xl-run.sh --checks-only LOG  (no build, no boot: the checks on a saved
#                                                    log; each boot's is kept as $OUT/lab.log)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${OUT:-${TMPDIR:-/tmp}/xen-disk-lab-xl}

. "$here/checks-lib.sh"

checks() {
  local timeouts d
  timeouts=$(sed -n "s/^LAB: timeout waiting for '\(.*\)'$/\1/p" <<<"$log" | paste -sd ';' -)
  check "dom0: every wait saw its guest line" "${timeouts:-none}" none
  check "config file: xl create with four tap disks" "$(value 'LAB: create' exit)" 0
  check "config file: libxl writes params aio: for format=raw" "$(value 'LAB: b params' params)" aio:/tmp/b.img
  check "config file: libxl writes params vhd: for format=vhd" "$(value 'LAB: c params' params)" vhd:/tmp/c.vhd
  check "config file: the hotplug script reports connected" "$(value 'LAB: b params' hotplug-status)" connected
  check "raw: guest reads what dom0 wrote" "$(value 'GUEST: xvdb size' md5-head)" "$(value 'LAB: b host-md5-head' host-md5-head)"
  check "raw: guest sees 32 MiB" "$(value 'GUEST: xvdb size' size)" 65536
  check "raw: dom0 finds what the guest wrote" "$(value 'LAB: b host-md5-pat' host-md5-pat)" "$(value 'GUEST: xvdb wrote' md5-pat)"
  check "vhd: served by the vhd plugin" "$(value 'LAB: c stack' stack)" vhd
  check "vhd: guest reads what dom0 wrote" "$(value 'GUEST: xvdc size' md5-head)" "$(value 'LAB: c host-md5-head' host-md5-head)"
  check "vhd: qemu-img compare with the guest's writes" "$(value 'LAB: c compare' compare)" 0
  check "descriptor: qcow2 served by the qcow2 plugin" "$(value 'LAB: d stack' stack)" qcow2
  check "descriptor: qcow2 guest reads what dom0 wrote" "$(value 'GUEST: xvdd size' md5-head)" "$(value 'LAB: d host-md5-head' host-md5-head)"
  check "descriptor: qcow2 qemu-img compare with the guest's writes" "$(value 'LAB: d compare' compare)" 0
  check "descriptor: qcow2 qemu-img check" "$(value 'LAB: d check' check)" 0
  check "descriptor: cow over a gold image served by cow" "$(value 'LAB: e stack' stack)" cow_over_file
  check "descriptor: cow guest reads the gold image" "$(value 'GUEST: xvde size' md5-head)" "$(value 'LAB: e host-md5-head' host-md5-head)"
  check "descriptor: cow leaves the gold image unchanged" "$(value 'LAB: e gold-unchanged' gold-unchanged)" yes
  check "block-attach: exits 0" "$(value 'LAB: attach' exit)" 0
  check "block-attach: guest reads what dom0 wrote" "$(value 'GUEST: xvdf seen' md5)" "$(value 'LAB: f host-md5' host-md5)"
  check "block-detach: exits 0" "$(value 'LAB: detach' exit)" 0
  check "block-detach: guest sees the disk go" "$(yes_if 'GUEST: xvdf gone')" yes
  check "block-detach: backend entries removed" "$(value 'LAB: f entries-left' entries-left)" no
  check "reboot: exits 0" "$(value 'LAB: reboot' exit)" 0
  check "reboot: a new domain with the disks made again" "$(value 'LAB: reboot domid-changed' domid-changed)" yes
  check "reboot: the old domain's entries removed" "$(value 'LAB: reboot old-entries-left' old-entries-left)" no
  for d in xvdc xvdd xvde; do
    check "reboot: $d data survives" "$(value "GUEST: $d after-reboot" md5-pat)" "$(value "GUEST: $d wrote" md5-pat)"
  done
  check "reboot: xvdb data survives" "$(value 'GUEST: xvdb after-reboot' md5-pat)" "$(value 'GUEST: xvdb wrote' md5-pat)"
  check "raw with a qcow2 header: still served raw (libxl's params)" "$(value 'LAB: b params-after-reboot' params-after-reboot)" aio:/tmp/b.img
  check "raw with a qcow2 header: still served by file" "$(value 'LAB: b stack-after-reboot' stack-after-reboot)" file
  check "raw with a qcow2 header: same size" "$(value 'GUEST: xvdb after-reboot' size)" "$(value 'GUEST: xvdb size' size)"
  check "raw with a qcow2 header: the guest reads back its header" "$(value 'GUEST: xvdb after-reboot' md5-hdr)" "$(value 'GUEST: xvdb wrote-qcow2-header' md5-hdr)"
  check "save: while the guest writes" "$(value 'LAB: save while-writing' while-writing)" yes
  check "save: exits 0" "$(value 'LAB: save' exit)" 0
  check "save: the saved domain's entries removed" "$(value 'LAB: save entries-left' entries-left)" no
  check "restore: exits 0" "$(value 'LAB: restore' exit)" 0
  check "restore: the guest's writer finishes" "$(value 'GUEST: writer done' blocks)" 200
  check "restore: every block the guest wrote is on disk" "$(value 'LAB: writer blocks-ok' blocks-ok)" 200
  check "destroy while writing: exits 0" "$(value 'LAB: destroy' exit)" 0
  check "destroy while writing: serve keeps running" "$(value 'LAB: serve alive-after-destroy' alive-after-destroy)" yes
  check "destroy while writing: no backend entries left" "$(value 'LAB: destroy entries-left' entries-left)" no
  check "destroy while writing: ctl lists none of its devices" "$(value 'LAB: destroy ctl-devices-left' ctl-devices-left)" 0
  check "serve: SIGTERM exits 0" "$(value 'LAB: serve exit' exit)" 0
}

[ "${1:-}" != "--checks-only" ] || checks_only "xen-lab xl" "${2:-}" "$0 --checks-only LOG (a lab run's log, e.g. $out/lab.log)"

lab=${XEN_LAB:-$here/xen-lab.sh}
start=$(date +%s)
cargo build --release --manifest-path "$root/Cargo.toml" -p xen-disk-host -p xen-disk-plugin-file \
  -p xen-disk-plugin-vhd -p xen-disk-plugin-qcow2 -p xen-disk-cow >/dev/null
t="$root/target/release"
LAB_RELEASE=13 OUT=$out bash "$lab" build "$t/xen-disk-host" "$t/libfile.so" "$t/libvhd.so" \
  "$t/libqcow2.so" "$t/libcow.so" "$(command -v qemu-img)" "$root/dist/hotplug/block-xen-disk" >/dev/null
boot_start=$(date +%s)
log=$(LAB_RELEASE=13 LAB_TIMEOUT=${LAB_TIMEOUT:-1200} OUT=$out bash "$lab" run "$here/xl-dom0.sh" "$here/xl-guest.sh" | tr -d '\r')
end=$(date +%s)
echo "$log"
echo "$log" >"$out/lab.log"
checks
# Where the boot's time went: each phase from dom0's uptime at its start to the next's.
echo "xen-lab xl: phases (s): $(sed -n 's/^LAB: phase \([a-z-]*\) t=\([0-9.]*\)$/\1 \2/p' <<<"$log" |
  awk 'NR > 1 { printf "%s %.0f, ", name, $2 - t } { name = $1; t = $2 }' | sed 's/, $//')"
echo "xen-lab xl: build $((boot_start - start))s, boot with all scenarios $((end - boot_start))s, whole run $((end - start))s (log: $out/lab.log; xl-run.sh --checks-only checks it again)"
summary "xen-lab xl"
