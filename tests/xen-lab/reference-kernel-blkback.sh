#!/bin/sh
# dom0 script: Linux's own in-kernel blkback serves the guest a 256 MiB loop device, set up
# the way a toolstack sets up a `phy` disk. It is the yardstick for run.sh --reference: the
# keys Linux's backend writes and the guest's read speed through it, in the same emulator.
# The lab must have been built with the release's loop.ko and xen-blkback.ko among its files
# (they land in /opt/xen-disk/); the guest script is guest-reference.sh.
M=/opt/xen-disk
for m in loop xen-blkback; do [ -f $M/$m.ko ] && insmod $M/$m.ko; done
[ -f $M/xen-blkback.ko ] || echo "LAB: reference: xen-blkback.ko was not given to xen-lab.sh build"

img=/tmp/ref.img
dd if=/dev/urandom of=$img bs=1M count=256 2>/dev/null
dev=$(losetup -f); losetup "$dev" $img
echo "LAB: reference loop=$dev"
echo "LAB: host-md5-head=$(dd if=$img bs=1M count=16 2>/dev/null | md5sum | cut -c1-32)"

cat > /tmp/ref.cfg <<CFG
name = "guest"
type = "pv"
kernel = "/guest/vmlinuz"
ramdisk = "/guest/initrd.gz"
extra = "console=hvc0"
memory = 256
vcpus = 1
on_poweroff = "destroy"
CFG
xl create /tmp/ref.cfg >/dev/null 2>&1
log=/var/log/xen/console/guest-guest.log
dom=$(xl domid guest)

# xvda (51712) as kernel blkback's `vbd` type, made while the guest boots. Without a
# transaction the order matters: each side drops a device whose peer directory is missing
# or whose peer `state` it cannot read when it probes. So both directories first (owner set
# before the keys, which inherit it), every key but `state` (`physical-device`, major:minor in
# hex, is what a hotplug script would add), then the frontend's `state`, the backend's last.
fe=/local/domain/$dom/device/vbd/51712; be=/local/domain/0/backend/vbd/$dom/51712
xenstore-write $fe ""; xenstore-chmod $fe n$dom r0
xenstore-write $be ""; xenstore-chmod $be n0 r$dom
xenstore-write $fe/backend $be $fe/backend-id 0 $fe/virtual-device 51712 $fe/device-type disk
xenstore-write $be/frontend $fe $be/frontend-id $dom $be/online 1 $be/mode w $be/params "$dev" \
  $be/type phy $be/dev xvda $be/device-type disk $be/physical-device "$(stat -L -c '%t:%T' "$dev")" \
  $be/hotplug-status connected
xenstore-write $fe/state 1
xenstore-write $be/state 1

n=0; until grep -qE 'GUEST: (wrote|write failed|no disk)' $log 2>/dev/null || [ $n -ge 240 ]; do sleep 1; n=$((n + 1)); done
xenstore-ls $be | grep -E 'state|feature|sectors|max' | sed 's/^/LAB: be /'
xenstore-ls $fe | sed 's/^/LAB: fe /'
# Unplug as a toolstack does: offline, then Closing; blkback and blkfront take it from there.
xenstore-write $be/online 0; xenstore-write $be/state 5
sleep 8
echo "LAB: host-md5-written=$(dd if=$img bs=1M skip=16 count=8 2>/dev/null | md5sum | cut -c1-32)"
grep 'GUEST:' $log | sed 's/^/LAB: /'
