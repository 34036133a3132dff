#!/bin/sh
# Guest side of the crash scenario (crash-dom0.sh): numbered 4 KiB blocks written one at a
# time to xvdb with O_DIRECT and fsync while dom0 kills serve with SIGKILL and starts it
# again; each write's time is measured (from /proc/uptime, in 10 ms steps), so the longest
# is the pause a crash costs. Then every block is read back with O_DIRECT, and the kernel
# log is searched for I/O errors.
waitdev() { i=0; while [ $i -lt "${2:-120}" ]; do [ -b /dev/$1 ] && return 0; sleep 1; i=$((i + 1)); done; echo "GUEST: $1 never appeared"; return 1; }
# Block K: "blkK" in 8 digits and a newline, repeated to 4 KiB.
blocks() { awk -v n="$1" 'BEGIN { for (k = 0; k < n; k++) { r = sprintf("blk%08d\n", k)
  while (length(r) < 4096) r = r r; printf "%s", substr(r, 1, 4096) } }'; }
# Centiseconds since boot.
now() { read u _ </proc/uptime; echo "${u%.*}${u#*.}"; }
N=800
waitdev xvdb || { sleep 100000; }
echo "GUEST: xvdb size=$(cat /sys/block/xvdb/size)"
blocks $N > /tmp/blocks
echo "GUEST: writer started"
k=0; max=0; slow=0
while [ $k -lt $N ]; do
  t0=$(now)
  dd if=/tmp/blocks of=/dev/xvdb bs=4096 skip=$k seek=$k count=1 oflag=direct conv=fsync 2>/dev/null || { echo "GUEST: writer failed at $k"; break; }
  d=$(( $(now) - t0 ))
  [ $d -gt $max ] && max=$d
  # A write that took 0.5 s or more: a pause (a kill and restart of serve).
  [ $d -ge 50 ] && { slow=$((slow + 1)); echo "GUEST: pause block=$k ms=$((d * 10))"; }
  k=$((k + 1))
  [ $((k % 100)) = 0 ] && echo "GUEST: progress blocks=$k"
done
echo "GUEST: writer done blocks=$k max-ms=$((max * 10)) pauses=$slow"
echo "GUEST: verify md5=$(dd if=/dev/xvdb bs=4096 count=$N iflag=direct 2>/dev/null | md5sum | cut -c1-32) want=$(md5sum </tmp/blocks | cut -c1-32)"
echo "GUEST: dmesg io-errors=$(dmesg | grep -ci 'i/o error\|blk_update_request\|xen-blkfront.*error')"
dmesg | grep -i 'blkfront\|xvdb' | tail -5 | sed 's/^/GUEST: dmesg /'
echo "GUEST: crash done"
sleep 100000
