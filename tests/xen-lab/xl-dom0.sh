#!/bin/sh
# dom0 side of the xl scenarios (Xen 4.20, LAB_RELEASE=13; one boot): `serve` runs with no
# configured disk, and every device comes from real `xl` commands: libxl writes the vbd3
# directories and runs the project's hotplug script (dist/hotplug/block-xen-disk).
#   guest config: xvdb raw (format=raw), xvdc vhd (format=vhd), xvdd qcow2 and xvde cow over
#                 a gold image (both through descriptors in /etc/xen-disk/xl)
#   xl block-attach / block-detach of xvdf while the guest runs
#   xl reboot (devices torn down and made again; data and the raw disk's qcow2-looking
#   header survive, still served raw), xl save + xl restore while the guest writes, xl
#   destroy while it writes
# Prints LAB: lines for xl-run.sh and, at the end, the guest's own GUEST: lines as they are.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export XEN_DISK_PLUGIN_PATH=/opt/xen-disk
H=/opt/xen-disk/xen-disk-host
QI=/opt/xen-disk/qemu-img
L=/var/log/xen/console/guest-guest.log
BE=/local/domain/0/backend/vbd3
md5() { dd if="$1" bs=1M skip="$2" count="$3" 2>/dev/null | md5sum | cut -c1-32; }
guestlines() { grep -o 'GUEST: .*' "$1"; }
# Relays the guest's lines not relayed yet, as they are (a domain made again, at a reboot or
# a restore, may start its console log afresh, so lines are remembered, not counted).
: > /tmp/glines
keep() { guestlines $L 2>/dev/null | awk -v f=/tmp/glines 'BEGIN { while ((getline l < f) > 0) seen[l] = 1 } !seen[$0]++' > /tmp/gnew
  cat /tmp/gnew; cat /tmp/gnew >> /tmp/glines; }
waitg() {
  i=0; while [ $i -lt "${2:-180}" ]; do grep -q "$1" $L 2>/dev/null && { keep; return 0; }; sleep 1; i=$((i + 1)); done
  keep; echo "LAB: timeout waiting for '$1'"; tail -20 $L | sed 's/^/LAB: console /'
  tail -20 /tmp/serve.log | sed 's/^/LAB: serve log /'
  xenstore-ls $BE 2>/dev/null | grep -E 'state|error|params|hotplug' | sed 's/^/LAB: backend /'
  return 1
}
# xl_ NAME ARGS...: runs `xl -vvv ARGS`, prints `LAB: NAME exit=N`, and its log's tail when
# it failed.
xl_() { n=$1; shift; xl -vvv "$@" > /tmp/xl-$n.log 2>&1; r=$?; echo "LAB: $n exit=$r"
  [ $r = 0 ] || { grep -v -E 'xswatch|ao__|ao_complete|xencall|ev_time|poller' /tmp/xl-$n.log | grep -i -E 'error|warn|fail|died|status|block-xen-disk|timed out' | head -40 | sed "s/^/LAB: $n log /"
    sed "s/^/LAB: $n serve log /" /tmp/serve.log | head -40; }
  return $r; }
# The deterministic patterns the guest writes, as xl-guest.sh makes them.
pattern() { awk -v s="xl-lab-$1" -v n=$(($2 << 20)) 'BEGIN { r = s "\n"; while (length(r) < n) r = r r; printf "%s", substr(r, 1, n) }'; }
blocks() { awk -v n="$1" 'BEGIN { for (k = 0; k < n; k++) { r = sprintf("blk%08d\n", k)
  while (length(r) < 4096) r = r r; printf "%s", substr(r, 1, 4096) } }'; }
# The plugin stack serving the guest's disk NAME, blanks as `_` ("cow_over_file").
# When each phase began, in seconds since dom0 booted (for the run's timing, not checked).
phase() { echo "LAB: phase $1 t=$(cut -d' ' -f1 /proc/uptime)"; }
stack_of() { $H ctl --socket /tmp/serve.sock list 2>/dev/null | grep "^[0-9]*/$1 " | sed 's/.* stack=//; s/ /_/g'; }

mkdir -p /etc/xen/scripts /etc/xen-disk/xl
cp /opt/xen-disk/block-xen-disk /etc/xen/scripts/block-xen-disk
chmod +x /etc/xen/scripts/block-xen-disk
$H serve --control /tmp/serve.sock --queues 2 > /tmp/serve.log 2>&1 & SP=$!

phase images
# The images: raw, vhd (from a raw reference), qcow2 (from another), a gold image for cow.
dd if=/dev/urandom of=/tmp/b.img bs=1M count=32 2>/dev/null
dd if=/dev/urandom of=/tmp/c.ref bs=1M count=32 2>/dev/null
dd if=/dev/urandom of=/tmp/d.ref bs=1M count=32 2>/dev/null
dd if=/dev/urandom of=/tmp/gold.img bs=1M count=32 2>/dev/null
$QI convert -f raw -O vpc /tmp/c.ref /tmp/c.vhd
$QI convert -f raw -O qcow2 /tmp/d.ref /tmp/d.qcow2
echo "LAB: b host-md5-head=$(md5 /tmp/b.img 0 4)"
echo "LAB: c host-md5-head=$(md5 /tmp/c.ref 0 4)"
echo "LAB: d host-md5-head=$(md5 /tmp/d.ref 0 4)"
echo "LAB: e host-md5-head=$(md5 /tmp/gold.img 0 4)"
GOLD_SHA=$(sha256sum /tmp/gold.img | cut -c1-64)
cat > /etc/xen-disk/xl/d.toml <<EOF
plugin = "qcow2"
[plugin-config]
path = "/tmp/d.qcow2"
EOF
cat > /etc/xen-disk/xl/e.toml <<EOF
plugin = "cow"
[plugin-config]
overlay = "/tmp/e.cow"
[plugin-config.base]
plugin = "file"
path = "/tmp/gold.img"
EOF

# 128 MiB for the guest: at 64 its kernel does not fit, at 96 its shell gets OOM-killed.
S="backendtype=tap,script=block-xen-disk"
cat > /tmp/guest.cfg <<CFG
name = "guest"
type = "pv"
kernel = "/guest/vmlinuz"
ramdisk = "/guest/initrd.gz"
extra = "console=hvc0"
memory = 128
vcpus = 2
on_poweroff = "destroy"
disk = [ 'vdev=xvdb,format=raw,$S,target=/tmp/b.img',
         'vdev=xvdc,format=vhd,$S,target=/tmp/c.vhd',
         'vdev=xvdd,format=raw,$S,target=/etc/xen-disk/xl/d.toml',
         'vdev=xvde,format=raw,$S,target=/etc/xen-disk/xl/e.toml' ]
CFG
phase create
xl_ create create /tmp/guest.cfg
D=$(xl domid guest 2>/dev/null)
for v in b:51728 c:51744 d:51760 e:51776; do
  echo "LAB: ${v%%:*} params=$(xenstore-read $BE/$D/${v#*:}/params 2>/dev/null) hotplug-status=$(xenstore-read $BE/$D/${v#*:}/hotplug-status 2>/dev/null)"
done
waitg 'GUEST: boot1 disks done' 120
for v in b:xvdb c:xvdc d:xvdd e:xvde; do echo "LAB: ${v%%:*} stack=$(stack_of ${v#*:})"; done

# Hot-plug: xvdf comes and goes while the guest runs.
dd if=/dev/urandom of=/tmp/f.img bs=1M count=16 2>/dev/null
echo "LAB: f host-md5=$(md5 /tmp/f.img 0 16)"
phase block-attach
xl_ attach block-attach guest "vdev=xvdf,format=raw,$S,target=/tmp/f.img"
waitg 'GUEST: xvdf seen'
xl_ detach block-detach guest xvdf
waitg 'GUEST: xvdf gone'
echo "LAB: f entries-left=$(xenstore-ls $BE/$D/51792 >/dev/null 2>&1 && echo yes || echo no)"
echo "LAB: f block-list=$(xl block-list guest 2>/dev/null | awk 'NR > 1 { printf "%s;", $1 }')"

# Reboot: libxl tears every device down and creates it again for the new domain.
phase reboot
xl_ reboot reboot guest
waitg 'GUEST: boot2 up' 120
D2=$(xl domid guest 2>/dev/null)
echo "LAB: reboot domid-changed=$([ -n "$D2" ] && [ "$D2" != "$D" ] && echo yes || echo no)"
echo "LAB: reboot old-entries-left=$(xenstore-ls $BE/$D >/dev/null 2>&1 && echo yes || echo no)"
waitg 'GUEST: boot2 checked'
echo "LAB: b params-after-reboot=$(xenstore-read $BE/$D2/51728/params 2>/dev/null)"
echo "LAB: b stack-after-reboot=$(stack_of xvdb)"

# Save and restore while the guest writes numbered blocks with O_DIRECT.
phase save
waitg 'GUEST: writer started'
sleep 1
echo "LAB: save while-writing=$(grep -q 'GUEST: writer done' $L && echo no || echo yes)"
xl_ save save guest /tmp/guest.save
echo "LAB: save entries-left=$(xenstore-ls $BE/$D2 >/dev/null 2>&1 && echo yes || echo no)"
xl_ restore restore /tmp/guest.save
rm -f /tmp/guest.save
D3=$(xl domid guest 2>/dev/null)
waitg 'GUEST: writer done' 240
n=$(grep -o 'GUEST: writer done blocks=[0-9]*' $L | sed 's/.*=//' | head -1)
# Blocks that differ from what the guest wrote, by number.
blocks "${n:-0}" > /tmp/blocks
bad=$(dd if=/tmp/b.img bs=4096 skip=2048 count="${n:-0}" 2>/dev/null | cmp -l - /tmp/blocks 2>/dev/null | awk '{ print int(($1 - 1) / 4096) }' | uniq | wc -l)
ok=$((${n:-0} - bad))
echo "LAB: writer blocks-ok=$ok"

# Destroy while the guest writes: serve keeps running and lets go of everything of it.
phase destroy
waitg 'GUEST: writing forever'
sleep 2
xl_ destroy destroy guest
sleep 2
echo "LAB: serve alive-after-destroy=$(kill -0 $SP 2>/dev/null && echo yes || echo no)"
echo "LAB: destroy entries-left=$(xenstore-ls $BE/$D3 >/dev/null 2>&1 && echo yes || echo no)"
echo "LAB: destroy ctl-devices-left=$($H ctl --socket /tmp/serve.sock list | grep -c "domain=$D3 ")"

# What dom0 holds: the guest's patterns at 8 MiB of the vhd, qcow2 and cow disks.
for x in c d; do
  cp /tmp/$x.ref /tmp/$x.exp
  pattern xvd$x 2 | dd of=/tmp/$x.exp bs=1M seek=8 conv=notrunc 2>/dev/null
done
$QI compare -f raw -F vpc /tmp/c.exp /tmp/c.vhd > /tmp/cmp-c.log 2>&1; echo "LAB: c compare=$?"
sed 's/^/LAB: c compare log /' /tmp/cmp-c.log
$QI compare -f raw -F qcow2 /tmp/d.exp /tmp/d.qcow2 > /tmp/cmp-d.log 2>&1; echo "LAB: d compare=$?"
sed 's/^/LAB: d compare log /' /tmp/cmp-d.log
$QI check -f qcow2 /tmp/d.qcow2 > /tmp/chk-d.log 2>&1; echo "LAB: d check=$?"
sed 's/^/LAB: d check log /' /tmp/chk-d.log
echo "LAB: e gold-unchanged=$([ "$(sha256sum /tmp/gold.img | cut -c1-64)" = "$GOLD_SHA" ] && echo yes || echo no)"
echo "LAB: b host-md5-pat=$(md5 /tmp/b.img 4 2)"

phase end
kill -TERM $SP; i=0; while kill -0 $SP 2>/dev/null && [ $i -lt 20 ]; do sleep 1; i=$((i + 1)); done
kill -TERM $SP 2>/dev/null; wait $SP; echo "LAB: serve exit=$?"
sed 's/^/LAB: serve log /' /tmp/serve.log
keep
