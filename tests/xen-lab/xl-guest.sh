#!/bin/sh
# Guest side of the xl scenarios (xl-dom0.sh): the same guest boots twice (`xl reboot`); a
# marker it writes to xvdb at 24 MiB tells the second boot from the first.
waitdev() { i=0; while [ $i -lt "${2:-120}" ]; do [ -b /dev/$1 ] && return 0; sleep 1; i=$((i + 1)); done; echo "GUEST: $1 never appeared"; dmesg | tail -15 | sed 's/^/GUEST: dmesg /'; return 1; }
gone() { i=0; while [ $i -lt 120 ]; do [ -b /dev/$1 ] || { echo "GUEST: $1 gone"; return 0; }; sleep 1; i=$((i + 1)); done; echo "GUEST: $1 still there"; }
md5() { dd if=/dev/$1 bs=1M skip=$2 count=$3 2>/dev/null | md5sum | cut -c1-32; }
size() { cat /sys/block/$1/size; }
# The patterns xl-dom0.sh builds too: MiB of "xl-lab-NAME" lines; the writer's N numbered
# 4 KiB blocks (block K: "blkK" in 8 digits and a newline, repeated).
pattern() { awk -v s="xl-lab-$1" -v n=$(($2 << 20)) 'BEGIN { r = s "\n"; while (length(r) < n) r = r r; printf "%s", substr(r, 1, n) }'; }
blocks() { awk -v n="$1" 'BEGIN { for (k = 0; k < n; k++) { r = sprintf("blk%08d\n", k)
  while (length(r) < 4096) r = r r; printf "%s", substr(r, 1, 4096) } }'; }
# A sector that starts like a qcow2 v3 header claiming 1 TiB with 64 KiB clusters.
qcow2_sector() {
  printf 'QFI\373\000\000\000\003\000\000\000\000\000\000\000\000\000\000\000\000\000\000\000\020\000\000\001\000\000\000\000\000'
  head -c 480 /dev/zero
}

waitdev xvdb 60 || { sleep 100000; }
if [ "$(dd if=/dev/xvdb bs=1M skip=24 count=1 2>/dev/null | head -c 6)" != "boot-1" ]; then
  # First boot: the four disks of the config file.
  for d in xvdb xvdc xvdd xvde; do
    waitdev $d 60 && echo "GUEST: $d size=$(size $d) md5-head=$(md5 $d 0 4)"
  done
  for d in xvdc xvdd xvde; do
    pattern $d 2 > /tmp/pat
    dd if=/tmp/pat of=/dev/$d bs=1M seek=8 conv=fsync 2>/dev/null && echo "GUEST: $d wrote md5-pat=$(md5sum /tmp/pat | cut -c1-32)" || echo "GUEST: $d write failed"
  done
  pattern xvdb 2 | dd of=/dev/xvdb bs=1M seek=4 conv=fsync 2>/dev/null
  echo "GUEST: xvdb wrote md5-pat=$(pattern xvdb 2 | md5sum | cut -c1-32)"
  qcow2_sector > /tmp/hdr
  dd if=/tmp/hdr of=/dev/xvdb bs=512 count=1 conv=fsync 2>/dev/null && echo "GUEST: xvdb wrote-qcow2-header md5-hdr=$(md5sum /tmp/hdr | cut -c1-32)"
  printf 'boot-1' | dd of=/dev/xvdb bs=1M seek=24 conv=fsync 2>/dev/null
  echo "GUEST: boot1 disks done"
  # Hot-plug.
  waitdev xvdf && { echo "GUEST: xvdf seen size=$(size xvdf) md5=$(md5 xvdf 0 16)"; gone xvdf; }
  sleep 100000
fi

echo "GUEST: boot2 up"
echo "GUEST: xvdb after-reboot size=$(size xvdb) md5-hdr=$(dd if=/dev/xvdb bs=512 count=1 2>/dev/null | md5sum | cut -c1-32) md5-pat=$(md5 xvdb 4 2)"
for d in xvdc xvdd xvde; do waitdev $d 60 && echo "GUEST: $d after-reboot md5-pat=$(md5 $d 8 2)"; done
echo "GUEST: boot2 checked"
# Numbered 4 KiB blocks at 8 MiB of xvdb, each written with O_DIRECT and flushed; dom0 saves
# and restores the guest meanwhile.
blocks 200 > /tmp/blocks
echo "GUEST: writer started"
k=0
while [ $k -lt 200 ]; do
  dd if=/tmp/blocks of=/dev/xvdb bs=4096 skip=$k seek=$((2048 + k)) count=1 oflag=direct conv=fsync 2>/dev/null || { echo "GUEST: writer failed at $k"; break; }
  k=$((k + 1))
done
echo "GUEST: writer done blocks=$k"
echo "GUEST: writing forever"
while :; do dd if=/dev/urandom of=/dev/xvdb bs=64k seek=192 count=64 oflag=direct 2>/dev/null; done
