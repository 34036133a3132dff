#!/bin/sh
# dom0 side of bench.sh: one guest, four disks, two of them served by Linux's in-kernel
# blkback and two by xen-disk-host, each pair with the same content or no storage at all:
#   xvdb kernel blkback over a loop device   xvdc xen-disk-host `file`   (same 128 MiB image
#                                                                          content, in tmpfs)
#   xvdd kernel blkback over null_blk        xvde xen-disk-host `discard` (1 GiB, no storage)
# The guest (bench-guest.sh) runs fio on one disk at a time and brackets each run with
# `GUEST: bench begin TAG` and `GUEST: bench end TAG ...`; at each, dom0 prints
#   LAB: mark TAG begin|end busy=TICKS own=NS csw=N evt=N
# busy: dom0's non-idle CPU ticks (all CPUs, USER_HZ), own: the serving threads' run time
# (ours: the whole process's, exited threads included; the kernel's: its blkback ring
# threads), csw: their context switches (ours: of the threads alive at the sample), evt: event-channel interrupts dom0 took from the disk's rings.
# With BENCH_PROFILE, the guest's `profile` runs on ours are traced with strace -c.
. /bench.conf
echo "LAB: bench conf pairs=$PAIRS secs=$SECS file=$(echo $FILE_WORKLOADS | tr " " ,) null=$(echo $NULL_WORKLOADS | tr " " ,) profile=$(echo $PROFILE_WORKLOADS | tr " " ,) ours-args=$(echo $BENCH_OURS_ARGS | tr " " ,) plugin=${OURS_PLUGIN:-file}"
export XEN_DISK_PLUGIN_PATH=/opt/xen-disk
# info: ours says at start whether it times every request or a sample (see "bench clock").
export XEN_DISK_LOG=info
M=/opt/xen-disk
H=$M/xen-disk-host
L=/var/log/xen/console/guest-guest.log
for m in loop xen-blkback null_blk; do
  [ -f $M/$m.ko ] || { echo "LAB: bench: $m.ko was not given to xen-lab.sh build"; exit 0; }
done
insmod $M/loop.ko; insmod $M/xen-blkback.ko
# null_blk needs configfs (shipped beside it when the release builds it as a module).
[ -f $M/configfs.ko ] && insmod $M/configfs.ko
# One 1 GiB null device, completing in the submitting context: no storage, no timer.
insmod $M/null_blk.ko nr_devices=1 gb=1 irqmode=0 queue_mode=2
[ -b /dev/nullb0 ] || { echo "LAB: bench: null_blk made no /dev/nullb0"; exit 0; }

waitg() {
  i=0; while [ $i -lt "${2:-300}" ]; do grep -q "$1" $L 2>/dev/null && return 0; sleep 1; i=$((i + 1)); done
  echo "LAB: timeout waiting for '$1'"; tail -20 $L | sed 's/^/LAB: console /'
  for f in /tmp/*.log; do [ -f "$f" ] && sed "s|^|LAB: $f: |" "$f"; done
  return 1
}

dd if=/dev/urandom of=/tmp/kernel.img bs=1M count=128 2>/dev/null
cp /tmp/kernel.img /tmp/ours.img
LOOP=$(losetup -f); losetup "$LOOP" /tmp/kernel.img
echo "LAB: bench image-md5=$(md5sum </tmp/kernel.img | cut -c1-32) ours-md5=$(md5sum </tmp/ours.img | cut -c1-32)"

cat > /tmp/guest.cfg <<CFG
name = "guest"
type = "pv"
kernel = "/guest/vmlinuz"
ramdisk = "/guest/initrd.gz"
extra = "console=hvc0"
memory = 768
vcpus = 2
on_poweroff = "destroy"
CFG
xl create /tmp/guest.cfg >/dev/null 2>&1
# Under emulation a guest kernel has once died in early boot (an oops in do_sync_core at
# 1.7 s, a kworker gone with interrupts off) and never came up: then it is created once more
# before the wait that fails the run.
up=0; i=0
while [ $i -lt 240 ]; do grep -q 'GUEST: up' $L 2>/dev/null && { up=1; break; }; sleep 1; i=$((i + 1)); done
if [ $up = 0 ]; then
  echo "LAB: bench: the guest was not up after 240 s; creating it again"
  tail -5 $L | sed 's/^/LAB: bench: first boot /'
  xl destroy guest >/dev/null 2>&1
  xl create /tmp/guest.cfg >/dev/null 2>&1
  waitg 'GUEST: up' 300 || exit 0
fi
D=$(xl domid guest)

# Kernel blkback's `vbd` device for DEV (a block device) at guest name VBD, as a toolstack
# makes one (the order reference-kernel-blkback.sh explains: directories, keys, states).
kernel_disk() { vbd=$1 id=$2 dev=$3
  fe=/local/domain/$D/device/vbd/$id; be=/local/domain/0/backend/vbd/$D/$id
  xenstore-write $fe ""; xenstore-chmod $fe n$D r0
  xenstore-write $be ""; xenstore-chmod $be n0 r$D
  xenstore-write $fe/backend $be $fe/backend-id 0 $fe/virtual-device $id $fe/device-type disk
  xenstore-write $be/frontend $fe $be/frontend-id $D $be/online 1 $be/mode w $be/params "$dev" \
    $be/type phy $be/dev $vbd $be/device-type disk $be/physical-device "$(stat -L -c '%t:%T' "$dev")" \
    $be/hotplug-status connected
  xenstore-write $fe/state 1
  xenstore-write $be/state 1
}
kernel_disk xvdb 51728 "$LOOP"
$H connect guest --plugin "${OURS_PLUGIN:-file}" -c path=/tmp/ours.img --vbd xvdc --queues 2 $BENCH_OURS_ARGS >/tmp/ours-file.log 2>&1 &
P_FILE=$!
kernel_disk xvdd 51760 /dev/nullb0
$H connect guest --plugin discard -c size=1G --vbd xvde --queues 2 $BENCH_OURS_ARGS >/tmp/ours-null.log 2>&1 &
P_NULL=$!
waitg 'GUEST: bench disks ready' 300 || exit 0

# What each backend and frontend wrote: the negotiated ring, queues, grants, segments.
# A frontend that writes no ring-page-order uses a one-page ring: order 0.
for id in 51728 51744 51760 51776; do
  fe=/local/domain/$D/device/vbd/$id; be=$(xenstore-read $fe/backend 2>/dev/null)
  r() { v=$(xenstore-read "$1/$2" 2>/dev/null); echo "${v:--}"; }
  echo "LAB: bench keys $id be-order=$(r $be max-ring-page-order) be-queues=$(r $be multi-queue-max-queues)" \
    "be-persistent=$(r $be feature-persistent) be-indirect=$(r $be feature-max-indirect-segments)" \
    "fe-order=$(xenstore-read $fe/ring-page-order 2>/dev/null || echo 0) fe-queues=$(r $fe multi-queue-num-queues)" \
    "fe-persistent=$(r $fe feature-persistent) state=$(r $be state)"
done
echo "LAB: bench threads file=$(ls /proc/$P_FILE/task | wc -l) discard=$(ls /proc/$P_NULL/task | wc -l)"

# blkback names its ring threads DOMID.DEV-QUEUE (older kernels blkback.DOMID.DEV-QUEUE);
# found once (they live as long as the disk), with the shell's own read: every process
# started here costs dom0 time under emulation, inside the window it measures.
kthreads() { for p in /proc/[0-9]*; do read -r c <$p/comm 2>/dev/null || continue
  case "$c" in $D.$1-*|blkback.$D.$1*) echo $p ;; esac; done; }
KT_FILE=$(kthreads xvdb); KT_NULL=$(kthreads xvdd)
echo "LAB: bench kernel-threads file=$(echo $KT_FILE | wc -w) null=$(echo $KT_NULL | wc -w)"
# The serving threads of the disk a tag names (SET.WORKLOAD.PAIR.BACKEND).
tasks() {
  case "${1#profile.}" in
    file.*.ours) echo /proc/$P_FILE/task/* ;;
    null.*.ours) echo /proc/$P_NULL/task/* ;;
    file.*.kernel) echo $KT_FILE ;;
    null.*.kernel) echo $KT_NULL ;;
  esac
}
# Ours: the process's own utime + stime (ticks of 10 ms), which keeps the time of threads
# that exited (an idle ring parks and its thread exits; idle workers exit): summing the live
# threads' run times would lose it. The kernel's ring threads live as long as the disk.
process() {
  case "${1#profile.}" in
    file.*.ours) echo /proc/$P_FILE/stat ;;
    null.*.ours) echo /proc/$P_NULL/stat ;;
  esac
}
# One awk over every file a sample needs (one process: see kthreads).
sample() {
  whole=$(process "$1")
  files=$whole
  for d in $(tasks "$1"); do
    [ -n "$whole" ] || files="$files $d/schedstat"
    files="$files $d/status"
  done
  # shellcheck disable=SC2086
  awk -v tag="$1" -v at="$2" '
    FILENAME == "/proc/stat" && /^cpu / { busy = $2 + $3 + $4 + $7 + $8 }
    FILENAME ~ /schedstat$/ { own += $1 }
    # Fields 14 and 15 of /proc/PID/stat (the name, field 2, has no spaces here).
    FILENAME ~ /^\/proc\/[0-9]+\/stat$/ { own += ($14 + $15) * 10000000 }
    FILENAME ~ /status$/ && /ctxt_switches/ { csw += $2 }
    # Columns 2..N+1 of /proc/interrupts are the N CPUs counts.
    FILENAME == "/proc/interrupts" && FNR == 1 { n = NF }
    FILENAME == "/proc/interrupts" && FNR > 1 && /blkif-backend|evtchn:/ && !/xenstore|xenconsole/ {
      for (i = 2; i <= n + 1; i++) evt += $i }
    END { printf "LAB: mark %s %s busy=%.0f own=%.0f csw=%.0f evt=%.0f\n", tag, at, busy, own, csw, evt }
  ' /proc/stat $files /proc/interrupts 2>/dev/null
}

done_lines=0
CR=$(printf '\r')
while :; do
  # The guest waits for dom0 after its last line (bench-guest.sh): a backend gone before
  # then went early.
  if grep -q 'GUEST: bench finished' $L 2>/dev/null && [ -z "$(grep -o 'GUEST: bench .*' $L | sed -n "$((done_lines + 1)),\$p")" ]; then
    break
  fi
  if ! kill -0 $P_FILE 2>/dev/null || ! kill -0 $P_NULL 2>/dev/null; then
    echo "LAB: bench: a xen-disk-host exited early"; sed 's/^/LAB: log /' /tmp/ours-*.log; break
  fi
  # The console log ends its lines with \r\n: a line without its \r is still being written
  # (read now, "GUEST: bench end" could be cut to "GUEST: bench en", and the mark lost).
  lines=$(grep -o "GUEST: bench .*$CR" $L 2>/dev/null | tr -d '\r' | sed -n "$((done_lines + 1)),\$p")
  if [ -z "$lines" ]; then
    grep -q 'GUEST: done' $L 2>/dev/null && break
    sleep 0.2; continue
  fi
  echo "$lines" | while read -r _ _ what tag _; do
    case "$what" in
      begin)
        sample "$tag" begin
        case "$tag" in profile.*)
          # Every thread by its id: -p with the process id alone traces its main thread.
          p=$(case $tag in *.null.*) echo $P_NULL ;; *) echo $P_FILE ;; esac)
          $M/strace -c -f -o /tmp/strace.$tag $(for t in /proc/$p/task/*; do echo "-p ${t##*/}"; done) 2>/dev/null &
          echo $! >/tmp/strace.pid ;;
        esac ;;
      end)
        sample "$tag" end
        case "$tag" in profile.*)
          kill -INT "$(cat /tmp/strace.pid)"; sleep 2
          awk -v t="$tag" 'NF >= 5 && $1 ~ /^[0-9.]+$/ { print "LAB: strace " t " " $NF " calls=" $4 }' /tmp/strace.$tag ;;
        esac ;;
    esac
  done
  done_lines=$((done_lines + $(echo "$lines" | wc -l)))
done

for p in $P_FILE $P_NULL; do
  $H ctl --socket /run/xen-disk/connect-$p.sock stats 2>/dev/null | sed "s/^/LAB: stats $p /"
  # Where ours spent its time over the whole boot, thread by thread.
  for t in /proc/$p/task/*; do
    read -r c <$t/comm; read -r ns _ <$t/schedstat; echo "LAB: bench thread $p $c ns=$ns"
  done
done
# Whether ours timed every request or a sample at the end (dom0's kernel may move to the xen
# clocksource, whose readings are system calls, after ours started: its rings look again).
cs=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource 2>/dev/null)
timed=$(grep -ho 'latency is timed on [a-z0-9 ]*' /tmp/ours-file.log | tail -1)
echo "LAB: bench clock clocksource=${cs:--} ${timed:-latency is timed on every request}"
echo "LAB: bench threads-after file=$(ls /proc/$P_FILE/task 2>/dev/null | wc -l) discard=$(ls /proc/$P_NULL/task 2>/dev/null | wc -l)"
kill -INT $P_FILE $P_NULL 2>/dev/null
waitg 'GUEST: done' 60
grep -o 'GUEST: .*' $L
