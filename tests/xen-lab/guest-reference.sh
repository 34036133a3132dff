#!/bin/sh
# Guest side of the kernel-blkback reference run: wait for its disk (xvda), time a cold read
# (coldread.sh), write a pattern for dom0 to find.
i=0; while [ $i -lt 120 ]; do [ -b /dev/xvda ] && break; sleep 1; i=$((i + 1)); done
[ -b /dev/xvda ] || { echo "GUEST: no disk"; exit 0; }
echo "GUEST: xvda size=$(cat /sys/block/xvda/size) queues=$(ls /sys/block/xvda/mq | wc -l)"
. /coldread.sh
coldread xvda 256
dd if=/dev/urandom of=/dev/xvda bs=1M seek=16 count=8 conv=fsync 2>/dev/null && echo "GUEST: wrote" || echo "GUEST: write failed"
