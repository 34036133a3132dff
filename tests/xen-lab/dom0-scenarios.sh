#!/bin/sh
# dom0 side of the Xen-lab scenarios (one boot). Starts one PV guest (2 vCPUs), then serves it
# one disk per scenario, each at its own device name so the guest script knows what to check:
#   xvdb file        xvdc mmap shared=false   xvdd discard     xvde file --readonly
#   xvdf file --sector-size 4096              xvdg file: mkfs, detach, reattach
#   xvdh file: blkfront reloaded with other parameters     xvdi/xvdj: `serve` (disks.toml and a
#   toolstack-made device), then `xl destroy`.
# Prints LAB: lines that run.sh checks, and relays the guests' own GUEST: lines as they are
# (each line starting with GUEST:), which is how run.sh tells them from dom0's messages that
# quote them (a timeout names the line it waited for). dom0's /tmp is a tmpfs of half its
# memory: each scenario removes its image when done.
# The lab puts the release's xl and xenstore tools on PATH (both releases).
export XEN_DISK_PLUGIN_PATH=/opt/xen-disk
H=/opt/xen-disk/xen-disk-host
L=/var/log/xen/console/guest-guest.log
md5() { dd if="$1" bs=1M skip="$2" count="$3" 2>/dev/null | md5sum | cut -c1-32; }
# A guest's lines from its console log $1, from `GUEST: ` on (a kernel message may have
# started the line).
guestlines() { grep -o 'GUEST: .*' "$1"; }
# When a guest's kernel died, its report from the first line on (a tail would keep only the
# end of the call trace, not what failed); fails when console log $1 holds none.
oops() {
  n=$(grep -n -m1 -E 'Kernel panic|BUG:|Oops|general protection fault|cut here' "$1" 2>/dev/null | cut -d: -f1)
  [ -n "$n" ] || return 1
  sed -n "$((n > 10 ? n - 10 : 1)),\$p" "$1" | head -150 | sed 's/^/LAB: console /'
}
# Waits for a guest console line matching $1 (up to $2 seconds).
waitg() {
  i=0; while [ $i -lt "${2:-240}" ]; do grep -q "$1" $L 2>/dev/null && return 0; sleep 1; i=$((i + 1)); done
  echo "LAB: timeout waiting for '$1'"; oops $L || tail -20 $L | sed 's/^/LAB: console /'
  for f in /tmp/*.log; do sed "s|^|LAB: $f: |" $f; done
  xenstore-ls /local/domain/0/backend/vbd3 2>/dev/null | grep -E 'state|error' | sed 's/^/LAB: backend /'
  return 1
}
# connect NAME ARGS...: serve a disk to the guest in the background.
attach() { n=$1; shift; $H connect guest "$@" > /tmp/$n.log 2>&1 & CP=$!; }
# Ctrl-C, then a second one if the guest has not let go in 20 s.
detach() {
  kill -INT $CP; i=0; while kill -0 $CP 2>/dev/null && [ $i -lt 20 ]; do sleep 1; i=$((i + 1)); done
  kill -INT $CP 2>/dev/null; wait $CP; echo "LAB: $1 exit=$?"; sed "s/^/LAB: $1 log /" /tmp/$1.log
}
rand() { dd if=/dev/urandom of="$1" bs=1M count="$2" 2>/dev/null; }

cat > /tmp/guest.cfg <<CFG
name = "guest"
type = "pv"
kernel = "/guest/vmlinuz"
ramdisk = "/guest/initrd.gz"
extra = "console=hvc0"
memory = 384
vcpus = 2
on_poweroff = "destroy"
CFG
xl create /tmp/guest.cfg >/dev/null 2>&1
waitg 'GUEST: up' 120 || exit 0
D=$(xl domid guest)

# 1. file: data both ways, a cold read, discard punches holes.
rand /tmp/b.img 256
echo "LAB: b host-md5-head=$(md5 /tmp/b.img 0 16)"
echo "LAB: b du-before=$(du -k /tmp/b.img | cut -f1)"
attach b --plugin file -c path=/tmp/b.img --vbd xvdb
waitg 'GUEST: xvdb done'
# Its rings parked while the guest idled (ctl stats counts it), before the read that woke them.
echo "LAB: b $($H ctl --socket /run/xen-disk/connect-$CP.sock stats $D/xvdb --json 2>&1 | grep -o '"parks":[0-9]*' | head -1 | tr -d '"' | tr : =)"
detach b
echo "LAB: b host-md5-written=$(md5 /tmp/b.img 16 8)"
echo "LAB: b du-after=$(du -k /tmp/b.img | cut -f1)"
rm -f /tmp/b.img

# 2. mmap, copy-on-write: the guest sees its writes, the image never changes.
rand /tmp/c.img 256
echo "LAB: c sha-before=$(sha256sum /tmp/c.img | cut -c1-64)"
attach c --plugin mmap -c path=/tmp/c.img -c shared=false --vbd xvdc
waitg 'GUEST: xvdc done'; detach c
echo "LAB: c sha-after=$(sha256sum /tmp/c.img | cut -c1-64)"
rm -f /tmp/c.img

# 3. discard: the path's own speed.
attach d --plugin discard -c size=256M --vbd xvdd
waitg 'GUEST: xvdd done'; detach d

# 4. read-only.
rand /tmp/e.img 64
echo "LAB: e host-md5-head=$(md5 /tmp/e.img 0 16)"
attach e --plugin file -c path=/tmp/e.img --readonly --vbd xvde
waitg 'GUEST: xvde done'; detach e
echo "LAB: e host-md5-after=$(md5 /tmp/e.img 0 16)"
rm -f /tmp/e.img

# 5. 4096-byte logical sectors.
rand /tmp/f.img 64
attach f --plugin file -c path=/tmp/f.img --sector-size 4096 --vbd xvdf
waitg 'GUEST: xvdf done'; detach f
echo "LAB: f host-md5-written=$(md5 /tmp/f.img 4 4)"
rm -f /tmp/f.img

# 6. A filesystem survives detach and reattach.
dd if=/dev/zero of=/tmp/g.img bs=1M count=64 2>/dev/null
attach g --plugin file -c path=/tmp/g.img --vbd xvdg
waitg 'GUEST: xvdg fs written'; detach g
waitg 'GUEST: xvdg gone before-reattach' 60
# Let the guest's xenbus finish with the old device before the same name comes back, as a
# toolstack waits for a frontend's removal before reusing its id.
sleep 5
attach g2 --plugin file -c path=/tmp/g.img --vbd xvdg
waitg 'GUEST: xvdg done'; detach g2
rm -f /tmp/g.img

# 7. A second guest whose blkfront asks for 2 queues, order-4 rings and no persistent grants
# (xen_blkfront.* on its command line); then it is destroyed and created again, and `serve`
# attaches its configured disk to the new domain: the data is intact.
L2=/var/log/xen/console/guest-guest2.log
guest2() { # $1: what the guest script should do (second / rebooted)
  sed -e 's/^name = .*/name = "guest2"/' \
      -e "s/^extra = .*/extra = \"console=hvc0 xdl=$1 xen_blkfront.max_queues=2 xen_blkfront.max_ring_page_order=4 xen_blkfront.feature_persistent=0\"/" \
      /tmp/guest.cfg > /tmp/guest2.cfg
  rm -f $L2; xl create /tmp/guest2.cfg >/dev/null 2>&1
}
waitg2() { o=$L; L=$L2; waitg "$@"; r=$?; L=$o; return $r; }
guest2 second
waitg2 'GUEST: up' 120
D2=$(xl domid guest2)
rand /tmp/h.img 64
echo "LAB: h host-md5=$(md5 /tmp/h.img 0 64)"
cat > /tmp/disks2.toml <<TOML
[[disk]]
domain = "guest2"
plugin = "file"
vbd = "xvdh"
queues = 2
[disk.plugin-config]
path = "/tmp/h.img"
TOML
$H serve --config /tmp/disks2.toml --control /tmp/serve2.sock > /tmp/serve2.log 2>&1 & SP2=$!
waitg2 'GUEST: xvdh done'
F=/local/domain/$D2/device/vbd/51824
echo "LAB: h fe queues=$(xenstore-read $F/multi-queue-num-queues 2>/dev/null) order=$(xenstore-read $F/ring-page-order 2>/dev/null) persistent=$(xenstore-read $F/feature-persistent 2>/dev/null)"
$H ctl --socket /tmp/serve2.sock stats $D2/xvdh | sed 's/^/LAB: h stats /'
echo "LAB: guest2's console:"; guestlines $L2
xl destroy guest2; sleep 3
guest2 rebooted
waitg2 'GUEST: xvdh after reboot'
echo "LAB: h reattached-to-new-domain=$(xl domid guest2)"
kill -TERM $SP2; i=0; while kill -0 $SP2 2>/dev/null && [ $i -lt 20 ]; do sleep 1; i=$((i + 1)); done
kill -TERM $SP2 2>/dev/null; wait $SP2; echo "LAB: h serve exit=$?"
sed 's/^/LAB: h serve log /' /tmp/serve2.log
echo "LAB: guest2's console after its reboot:"; guestlines $L2
xl destroy guest2 2>/dev/null
rm -f /tmp/h.img

# 8. serve: a configured disk and one the toolstack adds; then the guest is destroyed.
rand /tmp/i.img 32; rand /tmp/j.img 32
echo "LAB: i host-md5=$(md5 /tmp/i.img 0 32)"
echo "LAB: j host-md5=$(md5 /tmp/j.img 0 32)"
cat > /tmp/disks.toml <<TOML
[[disk]]
domain = "guest"
plugin = "file"
vbd = "xvdi"
[disk.plugin-config]
path = "/tmp/i.img"
TOML
$H serve --config /tmp/disks.toml --queues 2 > /tmp/serve.log 2>&1 & SP=$!
waitg 'GUEST: xvdi seen' 60
B=/local/domain/0/backend/vbd3/$D/51856; F=/local/domain/$D/device/vbd/51856
# As a toolstack without transactions must: each directory made and its permissions set
# before its keys (which inherit them), `state` written last (a guest's xenbus probes a
# frontend only when it can read state Initialising).
xenstore-write $B ""; xenstore-chmod $B n0 r$D
xenstore-write $B/frontend $F $B/frontend-id $D $B/online 1 $B/mode w $B/params file:/tmp/j.img $B/dev xvdj $B/device-type disk $B/state 1
xenstore-write $F ""; xenstore-chmod $F n$D r0
xenstore-write $F/backend $B $F/backend-id 0 $F/virtual-device 51856 $F/device-type disk $F/state 1
waitg 'GUEST: xvdj done'
xl destroy guest
sleep 5
echo "LAB: serve alive-after-destroy=$(kill -0 $SP 2>/dev/null && echo yes || echo no)"
echo "LAB: serve static-entries-left=$(xenstore-ls /local/domain/0/backend/vbd3/$D/51840 >/dev/null 2>&1 && echo yes || echo no)"
kill -TERM $SP; wait $SP; echo "LAB: serve exit=$?"
sed 's/^/LAB: serve log /' /tmp/serve.log
echo "LAB: guest's console:"; guestlines $L
