#!/bin/sh
# dom0 side of the crash scenario (crash-run.sh; one boot): serve, with journals in a state
# directory, serves a file disk from disks.toml to a guest (crash-guest.sh) that writes
# numbered blocks; each time the guest reports 100 more, dom0 kills serve with SIGKILL and
# starts it again at once, and the new serve must take the connected disk over (its log
# says "taken over"), with both sides' xenstore states left at 4 all along. Prints LAB:
# lines, then the guest's own GUEST: lines as they are.
export XEN_DISK_PLUGIN_PATH=/opt/xen-disk
H=/opt/xen-disk/xen-disk-host
L=/var/log/xen/console/guest-crash.log
KILLS=5
waitg() {
  i=0; while [ $i -lt "${2:-300}" ]; do grep -q "$1" $L 2>/dev/null && return 0; sleep 1; i=$((i + 1)); done
  echo "LAB: timeout waiting for '$1'"; tail -20 $L 2>/dev/null | sed 's/^/LAB: console /'
  tail -20 /tmp/serve.log | sed 's/^/LAB: serve log /'
  return 1
}
up() { cut -d' ' -f1 /proc/uptime; }
start_serve() { $H serve --config /tmp/disks.toml --control /tmp/serve.sock --state-dir /tmp/xd-state >> /tmp/serve.log 2>&1 & SP=$!; }

dd if=/dev/zero of=/tmp/c.img bs=1M count=32 2>/dev/null
cat > /tmp/disks.toml <<TOML
[[disk]]
domain = "crash"
plugin = "file"
vbd = "xvdb"
[disk.plugin-config]
path = "/tmp/c.img"
TOML
start_serve
cat > /tmp/crash.cfg <<CFG
name = "crash"
type = "pv"
kernel = "/guest/vmlinuz"
ramdisk = "/guest/initrd.gz"
extra = "console=hvc0"
memory = 256
vcpus = 1
on_poweroff = "destroy"
CFG
xl create /tmp/crash.cfg >/dev/null 2>&1
waitg 'GUEST: writer started' || exit 0
D=$(xl domid crash)
BE=/local/domain/0/backend/vbd3/$D/51728
FE=/local/domain/$D/device/vbd/51728
k=1
while [ $k -le $KILLS ]; do
  waitg "GUEST: progress blocks=$((k * 100))" || break
  kill -9 $SP; wait $SP 2>/dev/null
  t0=$(up)
  states="$(xenstore-read $BE/state) $(xenstore-read $FE/state)"
  start_serve
  i=0; while [ "$(grep -c 'taken over: the guest stays connected' /tmp/serve.log)" -lt $k ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
  echo "LAB: kill n=$k states=$(echo $states | tr ' ' ,) taken-over-after-s=$(awk -v a="$t0" -v b="$(up)" 'BEGIN { printf "%.2f", b - a }')"
  k=$((k + 1))
done
echo "LAB: kills done n=$((k - 1))"
waitg 'GUEST: crash done' 600
echo "LAB: serve taken-over=$(grep -c 'taken over: the guest stays connected' /tmp/serve.log) cannot-take=$(grep -c 'cannot take' /tmp/serve.log)"
echo "LAB: image md5=$(dd if=/tmp/c.img bs=4096 count=800 2>/dev/null | md5sum | cut -c1-32)"
grep -i 'taken over\|error\|warn' /tmp/serve.log | tail -30 | sed 's/^/LAB: serve log /'
echo "LAB: guest's console:"; grep -o 'GUEST: .*' $L
xl destroy crash 2>/dev/null
kill -9 $SP 2>/dev/null
