#!/bin/sh
# dom0 side of the package scenario (package-run.sh): xen-disk comes from its .deb, unpacked
# into dom0's root by `xen-lab.sh build deb:FILE`; nothing of ours is in /opt/xen-disk.
# `serve` runs as the service runs it: the ExecStart line of the installed unit, with the
# installed /etc/xen-disk/disks.toml given one disk for a guest that does not exist yet. The
# guest (package-guest.sh) reads it and writes to it; the unit's ExecReload then applies a
# second disk added to the file; its ExecStop hands the disks over while the guest writes,
# ExecStart again takes them over, and SIGINT detaches them. systemd's `$$` is `$` and
# $MAINPID is serve's pid, as systemd passes them. Prints LAB: lines, then the guest's own
# GUEST: lines as they are.
U=/usr/lib/systemd/system/xen-disk.service
C=/etc/xen-disk/disks.toml
L=/var/log/xen/console/guest-pkg.log
md5() { dd if="$1" bs=1M skip="$2" count="$3" 2>/dev/null | md5sum | cut -c1-32; }
rand() { dd if=/dev/urandom of="$1" bs=1M count="$2" 2>/dev/null; }
waitg() {
  i=0; while [ $i -lt "${2:-120}" ]; do grep -q "$1" $L 2>/dev/null && return 0; sleep 1; i=$((i + 1)); done
  echo "LAB: timeout waiting for '$1'"; tail -20 $L 2>/dev/null | sed 's/^/LAB: console /'
  cat /tmp/serve-1.log /tmp/serve.log | sed 's/^/LAB: serve log /'
  return 1
}
unit() { sed -n "s/^$1=//p" $U | sed 's/\$\$/$/g'; }

echo "LAB: pkg from-package=$([ -e /opt/xen-disk/xen-disk-host ] && echo no || echo yes) binary=$([ -x /usr/bin/xen-disk-host ] && echo yes || echo no) unit=$([ -f $U ] && echo yes || echo no) config=$([ -f $C ] && echo yes || echo no)"
echo "LAB: pkg plugins=$(ls /usr/lib/xen-disk/plugins | tr '\n' ' ')"
start=$(unit ExecStart); reload=$(unit ExecReload); stop=$(unit ExecStop)
echo "LAB: pkg exec-start=$start"

rand /tmp/b.img 32; rand /tmp/c.img 16
echo "LAB: b host-md5=$(md5 /tmp/b.img 0 32)"
echo "LAB: c host-md5=$(md5 /tmp/c.img 0 16)"
cat >> $C <<TOML

[[disk]]
domain = "pkg"
plugin = "file"
vbd = "xvdb"
[disk.plugin-config]
path = "/tmp/b.img"
TOML
# What the unit's RuntimeDirectory= makes: serve's control socket goes there.
mkdir -p /run/xen-disk
# As systemd does, something waits for serve and reaps it when it exits (ExecStop's `kill -0`
# must not find a zombie), keeping its exit status.
( $start > /tmp/serve.log 2>&1 & echo $! > /tmp/serve.pid; wait $!; echo $? > /tmp/serve.exit ) &
i=0; while [ ! -s /tmp/serve.pid ] && [ $i -lt 10 ]; do sleep 1; i=$((i + 1)); done
export MAINPID=$(cat /tmp/serve.pid)

cat > /tmp/pkg.cfg <<CFG
name = "pkg"
type = "pv"
kernel = "/guest/vmlinuz"
ramdisk = "/guest/initrd.gz"
extra = "console=hvc0"
memory = 256
vcpus = 1
on_poweroff = "destroy"
CFG
xl create /tmp/pkg.cfg >/dev/null 2>&1
waitg 'GUEST: up' 120 || exit 0
D=$(xl domid pkg)
waitg 'GUEST: xvdb back'
/usr/bin/xen-disk-host ctl list 2>&1 | sed 's/^/LAB: ctl /'

# systemctl reload: a second disk added to the file.
cat >> $C <<TOML

[[disk]]
domain = "pkg"
plugin = "file"
vbd = "xvdc"
readonly = true
[disk.plugin-config]
path = "/tmp/c.img"
TOML
eval "$reload"; echo "LAB: reload exit=$?"
waitg 'GUEST: disks done'

# systemctl stop: SIGTERM hands the disks over (serve keeps journals in the unit's
# RuntimeDirectory): the guest keeps both, attached, while no serve runs.
t0=$(date +%s); eval "$stop"; echo "LAB: stop exit=$? seconds=$(( $(date +%s) - t0 ))"
while [ ! -s /tmp/serve.exit ]; do sleep 1; done
echo "LAB: serve exit=$(cat /tmp/serve.exit)"
sleep 8
# The devices' backend directories (xvdb is 51728, xvdc 51744).
left() { l=no; for dev in 51728 51744; do xenstore-ls /local/domain/0/backend/vbd3/$D/$dev >/dev/null 2>&1 && l=yes; done; echo $l; }
states() { for dev in 51728 51744; do printf '%s,' "$(xenstore-read /local/domain/0/backend/vbd3/$D/$dev/state 2>/dev/null)"; done; }
echo "LAB: stopped entries-left=$(left) states=$(states)"
# systemctl start: the unit's ExecStart again; the new serve takes both disks over.
mv /tmp/serve.log /tmp/serve-1.log; rm -f /tmp/serve.exit /tmp/serve.pid
( $start > /tmp/serve.log 2>&1 & echo $! > /tmp/serve.pid; wait $!; echo $? > /tmp/serve.exit ) &
i=0; while [ ! -s /tmp/serve.pid ] && [ $i -lt 10 ]; do sleep 1; i=$((i + 1)); done
export MAINPID=$(cat /tmp/serve.pid)
waitg 'GUEST: xvdb across-restart back' 180
echo "LAB: restarted taken-over=$(grep -c 'taken over: the guest stays connected' /tmp/serve.log)"
# To detach for real: SIGINT (systemctl kill -s INT xen-disk).
kill -INT $MAINPID
while [ ! -s /tmp/serve.exit ]; do sleep 1; done
echo "LAB: serve interrupted exit=$(cat /tmp/serve.exit)"
waitg 'GUEST: xvdc gone' 30
echo "LAB: serve entries-left=$(left)"
echo "LAB: b host-md5-written=$(md5 /tmp/b.img 16 8)"
echo "LAB: c host-md5-after=$(md5 /tmp/c.img 0 16)"
cat /tmp/serve-1.log /tmp/serve.log | sed 's/^/LAB: serve log /'
echo "LAB: guest's console:"; grep -o 'GUEST: .*' $L
xl destroy pkg 2>/dev/null
