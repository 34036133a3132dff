#!/bin/sh
# Guest side of the live-backup scenario (backup-dom0.sh): numbered 4 KiB blocks written one
# after another to xvdb with O_DIRECT and fsync, block K at offset K * 4 KiB, until dom0
# writes STOP at the start of xvdc (read with O_DIRECT every few blocks). dom0 snapshots,
# copies and commits the disk meanwhile. Then every block written is read back with
# O_DIRECT and the kernel log is searched for I/O errors.
waitdev() { i=0; while [ $i -lt "${2:-120}" ]; do [ -b /dev/$1 ] && return 0; sleep 1; i=$((i + 1)); done; echo "GUEST: $1 never appeared"; return 1; }
# Blocks FROM .. FROM+N-1, block K being "blkK" in 8 digits and a newline repeated to 4 KiB
# (backup-dom0.sh makes the same bytes to check its copies).
blocks() { awk -v from="$1" -v n="$2" 'BEGIN { for (k = from; k < from + n; k++) { r = sprintf("blk%08d\n", k)
  while (length(r) < 4096) r = r r; printf "%s", substr(r, 1, 4096) } }'; }
stopped() { [ "$(dd if=/dev/xvdc bs=512 count=1 iflag=direct 2>/dev/null | head -c 4)" = STOP ]; }
waitdev xvdb || { sleep 100000; }
waitdev xvdc || { sleep 100000; }
size=$(cat /sys/block/xvdb/size)
echo "GUEST: xvdb size=$size"
# The disk's blocks, at most: past that the writer stops on its own (no check takes it
# for dom0's signal).
max=$((size / 8))
batch=64
echo "GUEST: writer started"
k=0; how=full
while [ $k -lt $max ]; do
  # A batch of blocks at a time in tmpfs, made as they are needed.
  [ $((k % batch)) = 0 ] && blocks $k $batch > /tmp/batch
  dd if=/tmp/batch of=/dev/xvdb bs=4096 skip=$((k % batch)) seek=$k count=1 oflag=direct conv=fsync 2>/dev/null || { how="failed-at-$k"; break; }
  k=$((k + 1))
  [ $((k % 10)) = 0 ] && echo "GUEST: progress blocks=$k"
  if [ $((k % 4)) = 0 ] && stopped; then how=stop; break; fi
done
echo "GUEST: writer done blocks=$k by=$how"
echo "GUEST: verify md5=$(dd if=/dev/xvdb bs=4096 count=$k iflag=direct 2>/dev/null | md5sum | cut -c1-32) want=$(blocks 0 $k | md5sum | cut -c1-32)"
echo "GUEST: dmesg io-errors=$(dmesg | grep -ci 'i/o error\|blk_update_request\|xen-blkfront.*error')"
dmesg | grep -i 'blkfront\|xvdb' | tail -5 | sed 's/^/GUEST: dmesg /'
echo "GUEST: backup done"
sleep 100000
