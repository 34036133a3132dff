#!/bin/sh
# Guest side: wait for xvdb, check the data dom0 put there, time a cold 256 MiB read, write a pattern.
# Guest side of the reference run: wait for the disk, check dom0's data, time a cold read, write a pattern.
for i in $(seq 1 90); do [ -b /dev/xvdb ] && break; sleep 1; done
[ -b /dev/xvdb ] || { echo "GUEST: no disk"; exit 0; }
echo "GUEST: size=$(cat /sys/block/xvdb/size) lbs=$(cat /sys/block/xvdb/queue/logical_block_size) ro=$(cat /sys/block/xvdb/ro)"
echo "GUEST: md5-head=$(dd if=/dev/xvdb bs=1M count=16 2>/dev/null | md5sum | cut -c1-32)"
echo 3 > /proc/sys/vm/drop_caches
s=$(cat /proc/uptime | cut -d' ' -f1)
dd if=/dev/xvdb of=/dev/null bs=1M count=256 2>/tmp/dd.err
e=$(cat /proc/uptime | cut -d' ' -f1)
echo "GUEST: dd-read 256MiB start=$s end=$e $(tail -1 /tmp/dd.err)"
dd if=/dev/urandom of=/tmp/pat bs=1M count=8 2>/dev/null
echo "GUEST: md5-pat=$(md5sum /tmp/pat | cut -c1-32)"
dd if=/tmp/pat of=/dev/xvdb bs=1M seek=16 conv=fsync 2>/tmp/dd.err && echo "GUEST: wrote" || echo "GUEST: write failed $(cat /tmp/dd.err)"
