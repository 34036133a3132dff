#!/bin/sh
# dom0 side: start the guest, attach a 256 MiB random image with `xen-disk-host connect --plugin file`,
# wait for the guest script, detach with Ctrl-C, then report what the image holds.
ln -sf /usr/lib/xen-4.17/bin/xl /bin/xl
export LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu:/lib/x86_64-linux-gnu:/usr/lib/xen-4.17/lib
dd if=/dev/urandom of=/tmp/disk.img bs=1M count=256 2>/dev/null
echo "LAB: host-md5-head=$(dd if=/tmp/disk.img bs=1M count=16 2>/dev/null | md5sum | cut -c1-32)"
cat > /tmp/guest.cfg <<CFG
name = "guest"
type = "pv"
kernel = "/guest/vmlinuz"
ramdisk = "/guest/initrd.gz"
extra = "console=hvc0"
memory = 256
vcpus = 1
on_poweroff = "destroy"
CFG
xl create /tmp/guest.cfg >/dev/null 2>&1; sleep 6
/opt/xen-disk/xen-disk-host connect guest --plugin file -c path=/tmp/disk.img > /tmp/connect.log 2>&1 &
CP=$!
L=/var/log/xen/console/guest-guest.log
for i in $(seq 1 200); do grep -q 'GUEST: wrote\|GUEST: write failed\|GUEST: no disk' $L 2>/dev/null && break; sleep 1; done
kill -INT $CP; sleep 8; kill -INT $CP 2>/dev/null; sleep 2
echo "LAB: host-md5-written=$(dd if=/tmp/disk.img bs=1M skip=16 count=8 2>/dev/null | md5sum | cut -c1-32)"
grep 'GUEST:' $L | sed 's/^/LAB: /'
sed 's/^/LAB: connect /' /tmp/connect.log
