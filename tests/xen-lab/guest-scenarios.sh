#!/bin/sh
# Guest side of the Xen-lab scenarios: handles each disk dom0 attaches, by its name (see
# dom0-scenarios.sh), and prints GUEST: lines with what it saw.
# waitdev NAME [SECONDS]: waits for /dev/NAME (240 s unless told).
waitdev() { i=0; while [ $i -lt "${2:-240}" ]; do [ -b /dev/$1 ] && return 0; sleep 1; i=$((i + 1)); done; echo "GUEST: $1 never appeared"; dmesg | tail -15 | sed 's/^/GUEST: dmesg /'; return 1; }
# gone NAME [WHEN]: waits for /dev/NAME to go; prints `GUEST: NAME gone[ WHEN]` or `still there`.
gone() { i=0; while [ $i -lt 120 ]; do [ -b /dev/$1 ] || { echo "GUEST: $1 gone${2:+ $2}"; return 0; }; sleep 1; i=$((i + 1)); done; echo "GUEST: $1 still there${2:+ $2}"; }
info() { echo "GUEST: $1 size=$(cat /sys/block/$1/size) lbs=$(cat /sys/block/$1/queue/logical_block_size) ro=$(cat /sys/block/$1/ro) queues=$(ls /sys/block/$1/mq | wc -l)"; }
md5() { dd if=/dev/$1 bs=1M skip=$2 count=$3 2>/dev/null | md5sum | cut -c1-32; }
# coldread NAME MIB: a cold read, checked (dd's status and its count) and timed.
. /coldread.sh
# ext2 for the filesystem scenario: the modules run.sh adds to this initramfs.
for m in crc32c_generic crc16 mbcache jbd2 ext4; do insmod /$m.ko 2>/dev/null; done
pattern() { dd if=/dev/urandom of=/tmp/pat bs=1M count=$1 2>/dev/null; md5sum /tmp/pat | cut -c1-32; }

# The second guest (dom0's scenario 7): its disk, with the blkfront parameters it was given.
case " $(cat /proc/cmdline) " in
  *" xdl=second "*)
    waitdev xvdh && {
      info xvdh
      echo "GUEST: xvdh md5=$(md5 xvdh 0 64)"
      coldread xvdh 64
      p=$(pattern 4)
      dd if=/tmp/pat of=/dev/xvdh bs=1M seek=32 conv=fsync 2>/dev/null && echo "GUEST: xvdh wrote md5-pat=$p" || echo "GUEST: xvdh write failed"
      echo "GUEST: xvdh done"
    }
    sleep 100000 ;;
  *" xdl=rebooted "*)
    waitdev xvdh && echo "GUEST: xvdh after reboot md5-pat=$(md5 xvdh 32 4) md5-head=$(md5 xvdh 0 32)"
    sleep 100000 ;;
esac

# 1. file
waitdev xvdb && {
  info xvdb
  echo "GUEST: xvdb md5-head=$(md5 xvdb 0 16)"
  coldread xvdb 256
  echo "GUEST: xvdb md5-pat=$(pattern 8)"
  dd if=/tmp/pat of=/dev/xvdb bs=1M seek=16 conv=fsync 2>/dev/null && echo "GUEST: xvdb wrote" || echo "GUEST: xvdb write failed"
  blkdiscard -o 134217728 -l 67108864 /dev/xvdb && echo "GUEST: xvdb discarded" || echo "GUEST: xvdb discard failed"
  # Idle past the backend's 5 s: its rings park without threads; the next read wakes them.
  sleep 8
  echo 3 >/proc/sys/vm/drop_caches
  echo "GUEST: xvdb after-park md5-pat=$(md5 xvdb 16 8)"
  echo "GUEST: xvdb done"; gone xvdb
}
# 2. mmap shared=false
waitdev xvdc && {
  info xvdc
  coldread xvdc 256
  p=$(pattern 8)
  dd if=/tmp/pat of=/dev/xvdc bs=1M conv=fsync 2>/dev/null
  echo 3 > /proc/sys/vm/drop_caches
  [ "$(md5 xvdc 0 8)" = "$p" ] && echo "GUEST: xvdc own writes visible" || echo "GUEST: xvdc own writes lost"
  echo "GUEST: xvdc done"; gone xvdc
}
# 3. discard
waitdev xvdd && { info xvdd; coldread xvdd 256; echo "GUEST: xvdd done"; gone xvdd; }
# 4. read-only
waitdev xvde && {
  info xvde
  echo "GUEST: xvde md5-head=$(md5 xvde 0 16)"
  if dd if=/dev/zero of=/dev/xvde bs=4096 count=1 oflag=direct 2>/dev/null; then echo "GUEST: xvde write accepted"; else echo "GUEST: xvde write refused"; fi
  echo "GUEST: xvde done"; gone xvde
}
# 5. 4096-byte sectors
waitdev xvdf && {
  info xvdf
  p=$(pattern 4)
  dd if=/tmp/pat of=/dev/xvdf bs=1M seek=4 conv=fsync 2>/dev/null
  echo 3 > /proc/sys/vm/drop_caches
  echo "GUEST: xvdf md5-pat=$p back=$(md5 xvdf 4 4)"
  echo "GUEST: xvdf done"; gone xvdf
}
# 6. filesystem across detach and reattach
waitdev xvdg && {
  mke2fs -q /dev/xvdg >/dev/null 2>&1 || echo "GUEST: xvdg mkfs failed"
  mkdir -p /mnt/g
  if mount -t ext2 /dev/xvdg /mnt/g; then
    dd if=/dev/urandom of=/mnt/g/data bs=1M count=3 2>/dev/null
    echo "hello from the guest" > /mnt/g/note
    m=$(md5sum /mnt/g/data | cut -c1-32)
    sync; umount /mnt/g
    echo "GUEST: xvdg fs written md5=$m"
  else
    echo "GUEST: xvdg mount failed"; m=none; echo "GUEST: xvdg fs written md5=none"
  fi
  gone xvdg before-reattach
  waitdev xvdg && {
    if mount -t ext2 /dev/xvdg /mnt/g && [ "$(md5sum /mnt/g/data | cut -c1-32)" = "$m" ] && grep -q hello /mnt/g/note; then
      echo "GUEST: xvdg fs intact"
    else
      echo "GUEST: xvdg fs lost"; ls -l /dev/xvd* | sed 's/^/GUEST: dev /'; dmesg | tail -15 | sed 's/^/GUEST: dmesg /'
    fi
    umount /mnt/g 2>/dev/null
    echo "GUEST: xvdg done"; gone xvdg
  }
}
# 8. serve: a configured disk, then a toolstack-made one; dom0 then destroys this guest.
# dom0 first runs the whole second-guest scenario (7), which took over 8 minutes on a loaded
# machine: wait for as long as dom0 may take.
waitdev xvdi 1800 && {
  echo "GUEST: xvdi seen"
  echo "GUEST: xvdi md5=$(md5 xvdi 0 32)"
  waitdev xvdj && { echo "GUEST: xvdj md5=$(md5 xvdj 0 32)"; echo "GUEST: xvdj done"; }
}
sleep 100000
