#!/bin/sh
# Guest side of the package scenario (package-dom0.sh): the disk serve attaches from the
# package's disks.toml (xvdb: read, written, read back), the one a reload adds (xvdc), a
# write across the service's stop and start (a hand-over), and both going away at SIGINT.
waitdev() { i=0; while [ $i -lt "${2:-120}" ]; do [ -b /dev/$1 ] && return 0; sleep 1; i=$((i + 1)); done; echo "GUEST: $1 never appeared"; return 1; }
gone() { i=0; while [ $i -lt 60 ]; do [ -b /dev/$1 ] || { echo "GUEST: $1 gone"; return 0; }; sleep 1; i=$((i + 1)); done; echo "GUEST: $1 still there"; }
md5() { dd if=/dev/$1 bs=1M skip=$2 count=$3 2>/dev/null | md5sum | cut -c1-32; }
waitdev xvdb && {
  echo "GUEST: xvdb size=$(cat /sys/block/xvdb/size) md5=$(md5 xvdb 0 32)"
  dd if=/dev/urandom of=/tmp/pat bs=1M count=8 2>/dev/null
  p=$(md5sum /tmp/pat | cut -c1-32)
  dd if=/tmp/pat of=/dev/xvdb bs=1M seek=16 conv=fsync 2>/dev/null && echo "GUEST: xvdb wrote md5-pat=$p" || echo "GUEST: xvdb write failed"
  echo 3 > /proc/sys/vm/drop_caches
  echo "GUEST: xvdb back md5-pat=$(md5 xvdb 16 8)"
}
waitdev xvdc && echo "GUEST: xvdc size=$(cat /sys/block/xvdc/size) ro=$(cat /sys/block/xvdc/ro) md5=$(md5 xvdc 0 16)"
echo "GUEST: disks done"
# dom0 now stops serve (a hand-over) and starts it again: this write, started while serve
# is stopping or stopped, waits and completes once the new serve has taken the disk over.
sleep 3
dd if=/dev/urandom of=/tmp/pat2 bs=1M count=4 2>/dev/null
p2=$(md5sum /tmp/pat2 | cut -c1-32)
dd if=/tmp/pat2 of=/dev/xvdb bs=1M seek=24 oflag=direct conv=fsync 2>/dev/null && echo "GUEST: xvdb across-restart wrote md5-pat=$p2" || echo "GUEST: xvdb across-restart write failed"
echo 3 > /proc/sys/vm/drop_caches
echo "GUEST: xvdb across-restart back md5-pat=$(md5 xvdb 24 4)"
dmesg | grep -qi 'i/o error' && echo "GUEST: io-errors=yes" || echo "GUEST: io-errors=no"
gone xvdb; gone xvdc
sleep 100000
