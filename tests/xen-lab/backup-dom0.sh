#!/bin/sh
# dom0 side of the live-backup scenario (backup-run.sh; one boot): serve gives a guest
# (backup-guest.sh) a 32 MiB file disk of random bytes, which the guest overwrites with
# numbered 4 KiB blocks, one after another, until told to stop. Meanwhile dom0 backs the
# disk up twice as a user would: `ctl snapshot` (export over a Unix socket), a full copy
# with nbdcopy, `ctl commit`; then a second snapshot, whose dirty bitmap
# (qemu:dirty-bitmap:s1, read with nbdinfo) drives an incremental copy with qemu-img into a
# copy of the first backup, and a second commit. Each copy is compared with the frozen image
# file (sha256) and with the guest's blocks. Then dom0 writes STOP at the start of the
# guest's second disk (xvdc), and compares its image with what the guest wrote. Prints LAB:
# lines, then the guest's own GUEST: lines as they are.
export XEN_DISK_PLUGIN_PATH=/opt/xen-disk
O=/opt/xen-disk
H=$O/xen-disk-host
L=/var/log/xen/console/guest-backup.log
IMG=/tmp/b.img
ctl() { $H ctl --socket /tmp/serve.sock "$@" 2>&1; }
uri() { echo "nbd+unix:///?socket=/tmp/$1.sock"; }
waitg() {
  i=0; while [ $i -lt "${2:-300}" ]; do grep -q "$1" $L 2>/dev/null && return 0; sleep 1; i=$((i + 1)); done
  echo "LAB: timeout waiting for '$1'"; tail -20 $L 2>/dev/null | sed 's/^/LAB: console /'
  tail -20 /tmp/serve.log | sed 's/^/LAB: serve log /'
  return 1
}
up() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(up)" 'BEGIN { printf "%.1f", b - a }'; }
# The blocks the guest has reported so far (it reports every 10).
progress() { p=$(grep -o 'GUEST: progress blocks=[0-9]*' $L 2>/dev/null | tail -1 | sed 's/.*=//'); echo "${p:-0}"; }
# Waits until the guest has written N more blocks than it reported so far.
more() { waitg "GUEST: progress blocks=$(( ($(progress) + $1) / 10 * 10 ))" 600; }
sha() { sha256sum <"$1" | cut -c1-64; }
stack() { ctl list | grep ' vbd=xvdb ' | sed 's/.* stack=//' | tr ' ' _; }
# The same blocks as backup-guest.sh writes.
blocks() { awk -v from="$1" -v n="$2" 'BEGIN { for (k = from; k < from + n; k++) { r = sprintf("blk%08d\n", k)
  while (length(r) < 4096) r = r r; printf "%s", substr(r, 1, 4096) } }'; }
# Whether block K of FILE is the guest's (its first bytes; NULs of the random original
# dropped, which a shell variable cannot hold).
written() { [ "$(dd if="$1" bs=4096 skip="$2" count=1 2>/dev/null | head -c 11 | tr -d '\0')" = "$(printf 'blk%08d' "$2")" ]; }
# The guest writes blocks in order, one at a time: a copy of the disk at an instant holds
# blocks 0 .. C-1 as the guest wrote them and the original bytes after. C, by bisection.
cut_of() { lo=0; hi=$BLOCKS
  while [ $lo -lt $hi ]; do m=$(( (lo + hi) / 2 )); if written "$1" $m; then lo=$((m + 1)); else hi=$m; fi; done
  echo $lo
}
# ok when FILE holds exactly the guest's first C blocks and the original bytes after them.
content() {
  [ "$(dd if="$1" bs=4096 count="$2" 2>/dev/null | md5sum)" = "$(blocks 0 "$2" | md5sum)" ] || { echo bad-blocks; return; }
  [ "$(dd if="$1" bs=4096 skip="$2" 2>/dev/null | md5sum)" = "$(dd if=/tmp/orig.img bs=4096 skip="$2" 2>/dev/null | md5sum)" ] || { echo bad-rest; return; }
  echo ok
}

BLOCKS=8192
dd if=/dev/urandom of=/tmp/orig.img bs=1M count=32 2>/dev/null
cp /tmp/orig.img $IMG
dd if=/dev/zero of=/tmp/ctl.img bs=1M count=1 2>/dev/null
cat > /tmp/disks.toml <<TOML
[[disk]]
domain = "backup"
plugin = "file"
vbd = "xvdb"
[disk.plugin-config]
path = "$IMG"

[[disk]]
domain = "backup"
plugin = "file"
vbd = "xvdc"
[disk.plugin-config]
path = "/tmp/ctl.img"
TOML
$H serve --config /tmp/disks.toml --control /tmp/serve.sock >> /tmp/serve.log 2>&1 &
SP=$!
cat > /tmp/backup.cfg <<CFG
name = "backup"
type = "pv"
kernel = "/guest/vmlinuz"
ramdisk = "/guest/initrd.gz"
extra = "console=hvc0"
memory = 256
vcpus = 1
on_poweroff = "destroy"
CFG
xl create /tmp/backup.cfg >/dev/null 2>&1
waitg 'GUEST: writer started' 600 || exit 0
DEV=$(xl domid backup)/xvdb
more 20 || exit 0

# The first (full) backup.
t=$(up); p=$(progress)
out=$(ctl snapshot $DEV --nbd unix:/tmp/s1.sock --name s1); rc=$?; s=$(since $t)
echo "LAB: snapshot1 rc=$rc progress=$p stack=$(stack) s=$s"
echo "LAB: ctl s1: $out"
t=$(up); before=$(sha $IMG)
$O/nbdcopy "$(uri s1)" /tmp/backup1.img; rc=$?; s=$(since $t); p=$(progress)
echo "LAB: backup1 rc=$rc copy=$(sha /tmp/backup1.img) base=$before base-after=$(sha $IMG) s=$s progress=$p"
C1=$(cut_of /tmp/backup1.img)
echo "LAB: backup1-blocks cut=$C1 content=$(content /tmp/backup1.img "$C1")"
t=$(up); p=$(progress)
out=$(ctl commit $DEV); rc=$?; s=$(since $t); p="$p-$(progress)"
$O/nbdinfo --size "$(uri s1)" >/dev/null 2>&1 && export=open || export=gone
echo "LAB: commit1 rc=$rc stack=$(stack) export=$export s=$s progress=$p"
echo "LAB: ctl commit1: $out"

# The guest writes on; the second (incremental) backup.
more 20 || exit 0
t=$(up); p=$(progress)
out=$(ctl snapshot $DEV --nbd unix:/tmp/s2.sock --name s2); rc=$?; s=$(since $t)
echo "LAB: snapshot2 rc=$rc progress=$p stack=$(stack) s=$s"
echo "LAB: ctl s2: $out"
t=$(up); before=$(sha $IMG)
$O/nbdcopy "$(uri s2)" /tmp/backup2.img; rc=$?; s=$(since $t); p=$(progress)
echo "LAB: backup2 rc=$rc copy=$(sha /tmp/backup2.img) base=$before base-after=$(sha $IMG) s=$s progress=$p"
C2=$(cut_of /tmp/backup2.img)
echo "LAB: backup2-blocks cut=$C2 content=$(content /tmp/backup2.img "$C2")"
# The dirty bitmap: flags 1 marks a dirty extent (adjacent ones merged). Expected: the
# 64 KiB blocks holding the guest's blocks C1 .. C2-1, its writes between the two freezes.
t=$(up)
$O/nbdinfo --map=qemu:dirty-bitmap:s1 "$(uri s2)" > /tmp/map 2>/tmp/map.err; rc=$?
awk '$3 % 2 == 1 { if (n && $1 == s + l) l += $2; else { if (n) print s, l; s = $1; l = $2; n = 1 } }
  END { if (n) print s, l }' /tmp/map > /tmp/dirty
echo "LAB: dirty rc=$rc $(awk -v lo=$((C1 * 4096)) -v hi=$((C2 * 4096)) '
  { n++; b += $2; if (n == 1) first = $1; end = $1 + $2
    s = $1 > lo ? $1 : lo; e = $1 + $2 < hi ? $1 + $2 : hi; if (e > s) cov += e - s }
  END { printf "ranges=%d bytes=%d first=%d end=%d covered=%d", n, b, first, end, cov }' /tmp/dirty) want-first=$((C1 * 4096 / 65536 * 65536)) want-end=$(( (C2 * 4096 + 65535) / 65536 * 65536 )) want-covered=$(( (C2 - C1) * 4096 ))"
sed 's/^/LAB: map /' /tmp/map /tmp/map.err | head -8
# The incremental copy: the first backup, with the dirty ranges read from the export.
cp /tmp/backup1.img /tmp/inc.img
bad=0
while read -r off len; do
  $O/qemu-img convert -n \
    --image-opts "driver=raw,offset=$off,size=$len,file.driver=nbd,file.server.type=unix,file.server.path=/tmp/s2.sock" \
    --target-image-opts "driver=raw,offset=$off,size=$len,file.driver=file,file.filename=/tmp/inc.img" || bad=$((bad + 1))
done < /tmp/dirty
s=$(since $t)
echo "LAB: incremental failed=$bad copy=$(sha /tmp/inc.img) s=$s"
t=$(up); p=$(progress)
out=$(ctl commit $DEV); rc=$?; s=$(since $t); p="$p-$(progress)"
$O/nbdinfo --size "$(uri s2)" >/dev/null 2>&1 && export=open || export=gone
echo "LAB: commit2 rc=$rc stack=$(stack) export=$export s=$s progress=$p"
echo "LAB: ctl commit2: $out"
echo "LAB: after-commit2 progress=$(progress)"

# A few more blocks after the last commit, then the guest stops and checks what it wrote.
more 10
printf STOP | dd of=/tmp/ctl.img conv=notrunc 2>/dev/null
waitg 'GUEST: backup done' 600
K=$(grep -o 'GUEST: writer done blocks=[0-9]*' $L | sed 's/.*=//')
echo "LAB: image blocks=${K:-?} md5=$(dd if=$IMG bs=4096 count="${K:-0}" 2>/dev/null | md5sum | cut -c1-32) rest=$(dd if=$IMG bs=4096 skip="${K:-0}" 2>/dev/null | md5sum | cut -c1-32) want-rest=$(dd if=/tmp/orig.img bs=4096 skip="${K:-0}" 2>/dev/null | md5sum | cut -c1-32)"
echo "LAB: serve errors=$(grep -c ' ERROR ' /tmp/serve.log)"
grep -i 'snapshot\|error\|warn' /tmp/serve.log | tail -20 | sed 's/^/LAB: serve log /'
echo "LAB: guest's console:"; grep -o 'GUEST: .*' $L
xl destroy backup 2>/dev/null
kill $SP 2>/dev/null
