#!/bin/sh
# Guest side of bench.sh: fio (shipped with its libraries in /opt/xen-disk) on one disk at a
# time, the kernel's and ours interleaved (A B A B ...). One fio process runs every run as a
# job of its own, one after the other (stonewall): loading fio's libraries takes long under
# emulation, once is enough. Each job is bracketed, on the console, by
#   GUEST: bench begin TAG          (then 2 s for dom0 to take its sample)
#   GUEST: bench end TAG evt=E      (E: event-channel interrupts the guest took from its disks)
# and once fio is done every job's figures follow:
#   GUEST: bench result TAG rc=R kb=KIB ms=MS ios=N
# TAG is SET.WORKLOAD.PAIR.BACKEND; kb and ms are fio's, ios the requests it completed.
. /bench.conf
FIO=/opt/xen-disk/fio
for d in xvdb xvdc xvdd xvde; do
  i=0; while [ $i -lt 240 ] && [ ! -b /dev/$d ]; do sleep 1; i=$((i + 1)); done
  [ -b /dev/$d ] || { echo "GUEST: bench no disk $d"; exit 0; }
  echo "GUEST: bench disk $d sectors=$(cat /sys/block/$d/size) queues=$(ls /sys/block/$d/mq | wc -l)" \
    "max-segments=$(cat /sys/block/$d/queue/max_segments) max-kb=$(cat /sys/block/$d/queue/max_sectors_kb)"
done
echo "GUEST: bench disks ready"
$FIO --version | sed 's/^/GUEST: bench fio /'

# The hook fio runs around each job (exec_prerun/exec_postrun, whose own output fio keeps
# in files: the lines go to the console directly).
cat >/tmp/hook <<'EOF'
#!/bin/sh
e=$(awk 'NR == 1 { n = NF; next } /blkif/ { for (i = 2; i <= n + 1; i++) s += $i } END { printf "%.0f", s }' /proc/interrupts)
if [ "$1" = begin ]; then
  echo "$e" >/tmp/evt0; echo "GUEST: bench begin $2" >/dev/console; sleep 2
else
  echo "GUEST: bench end $2 evt=$((e - $(cat /tmp/evt0)))" >/dev/console; sleep 1
fi
EOF
chmod +x /tmp/hook

# job TAG DEV WORKLOAD
job() {
  case "$3" in
    rr) a="rw=randread bs=4k iodepth=32" ;;
    rw) a="rw=randwrite bs=4k iodepth=32" ;;
    sr) a="rw=read bs=1M iodepth=8" ;;
    sw) a="rw=write bs=1M iodepth=8" ;;
  esac
  echo "[$1]"; echo "filename=/dev/$2"; for kv in $a; do echo "$kv"; done
  echo "stonewall"; echo "exec_prerun=/tmp/hook begin $1"; echo "exec_postrun=/tmp/hook end $1"
}
{
  echo "[global]"; echo "ioengine=libaio"; echo "direct=1"; echo "thread"; echo "time_based"
  echo "runtime=$SECS"
  for w in $FILE_WORKLOADS; do
    p=1; while [ $p -le "$PAIRS" ]; do
      job file.$w.$p.kernel xvdb $w; job file.$w.$p.ours xvdc $w; p=$((p + 1))
    done
  done
  for w in $NULL_WORKLOADS; do
    p=1; while [ $p -le "$PAIRS" ]; do
      job null.$w.$p.kernel xvdd $w; job null.$w.$p.ours xvde $w; p=$((p + 1))
    done
  done
  # One run per workload on ours with dom0 counting its system calls (slower: not in the
  # table).
  for w in $PROFILE_WORKLOADS; do job profile.file.$w.1.ours xvdc $w; done
} >/tmp/bench.fio

cd /tmp || exit 0
$FIO --output-format=terse --terse-version=3 --output=/tmp/fio.out /tmp/bench.fio 2>/tmp/fio.err
rc=$?
[ $rc = 0 ] || { echo "GUEST: bench fio-error rc=$rc"; sed 's/^/GUEST: bench fio-error /' /tmp/fio.err | head -5; }
# terse v3: 3 job name, 5 error, 6-9 read KiB, KiB/s, IOPS, ms; 47-50 the same for writes.
# Requests from the bytes and the block size (fio's IOPS are whole numbers).
awk -F';' 'NF > 50 { kb = $6 + $47; ms = ($9 > $50) ? $9 : $50; bs = ($3 ~ /\.s[rw]\./) ? 1024 : 4
  printf "GUEST: bench result %s rc=%d kb=%.0f ms=%.0f ios=%.0f\n", $3, $5, kb, ms, kb / bs }' /tmp/fio.out
echo "GUEST: bench finished"
# dom0 reads our backends' counters and detaches them before this guest goes.
i=0; while [ $i -lt 60 ] && [ -b /dev/xvde ]; do sleep 1; i=$((i + 1)); done
