#!/usr/bin/env bash
# The README's `ceph-rbd` sets in one command: for each pattern, a fresh one-node cluster
# (tests/ceph-lab/ceph-one-node.sh) with a 1 GiB image written once, one pair that is not
# counted (the cluster's first requests warm it), then N same-run pairs of the plugin and
# its fair reference through scripts/pairs.sh, then the cluster is stopped. A fresh cluster
# per pattern keeps one pattern's writes from filling the memstore OSD under the next.
#
# Usage: scripts/ceph-sets.sh N [RW:BS...] [-- BENCH-ARGS...]
#   RW:BS     the patterns (default: randread:4k randwrite:4k read:1M write:1M)
#   BENCH-ARGS added to every bench run, e.g. -- --submit (the plugin without the ring)
#   e.g. scripts/ceph-sets.sh 6
#        scripts/ceph-sets.sh 6 randread:4k -- --submit
# Every run is `bench ceph-rbd -c pool=rbd -c image=bench -c conf=DIR/ceph.conf --rw RW
# --bs BS --iodepth 16 --poll-us 0 --seconds S --client-cpu 0 --rbd-bench BENCH-ARGS`
# (without --client-cpu under SETS_CPU).
# Ends with one line per pattern: its median ratio to `rbd-fair` and to `rbd bench`.
#
# Environment: SETS_SECONDS (S, default 2), SETS_IMAGE (the image's size, default 1G),
# SETS_DIR (where the cluster lives, default a new temporary folder, removed at the end),
# XEN_DISK_HOST (as for pairs.sh), SETS_CPU (a CPU number: the cluster's daemons and every
# bench run on that one CPU, without --client-cpu; nothing then waits on a wake-up from
# another CPU, and each side's figure is its CPU time per request, the cluster's included).
# The monitor's port is fixed (see ceph-one-node.sh): one cluster at a time on a machine,
# so nothing else may run one meanwhile (tests/ceph_rbd.rs).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
lab=$here/../tests/ceph-lab/ceph-one-node.sh
usage() {
  echo "usage: $0 N [RW:BS...] [-- BENCH-ARGS...]   (N: pairs per pattern, at least 1)" >&2
  exit 2
}
n=${1:-}
case "$n" in '' | *[!0-9]* | 0) usage ;; esac
shift
patterns=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do
  case "$1" in
    randread:* | randwrite:* | read:* | write:*)
      bs=${1#*:}
      case "$bs" in '' | *[!0-9kKmM]*)
        echo "$0: pattern $1: the block size must be a number with k or M, e.g. read:1M" >&2
        exit 2 ;;
      esac
      patterns+=("$1") ;;
    *) echo "$0: pattern $1: expected RW:BS with RW one of randread, randwrite, read, write" >&2
       exit 2 ;;
  esac
  shift
done
[ $# -gt 0 ] && shift  # the --
extra=("$@")
[ ${#patterns[@]} -gt 0 ] || patterns=(randread:4k randwrite:4k read:1M write:1M)
seconds=${SETS_SECONDS:-2}
image=${SETS_IMAGE:-1G}
cpu=${SETS_CPU:-}
if [ -n "$cpu" ]; then
  case "$cpu" in *[!0-9]*)
    echo "$0: SETS_CPU=$cpu: expected a CPU number, e.g. SETS_CPU=1" >&2
    exit 2 ;;
  esac
  taskset -c "$cpu" true 2>/dev/null || {
    echo "$0: SETS_CPU=$cpu: this process may not run on CPU $cpu (taskset -p $$ says which it may)" >&2
    exit 2
  }
  pin=(taskset -c "$cpu") client=()
else
  pin=() client=(--client-cpu 0)
fi
for t in rbd bash; do
  command -v "$t" >/dev/null || { echo "$0: $t is missing (apt-get install ceph-common)" >&2; exit 1; }
done

if [ -n "${SETS_DIR:-}" ]; then dir=$SETS_DIR; own=''; else dir=$(mktemp -d); own=1; fi
cleanup() {
  bash "$lab" stop "$dir/c" >/dev/null 2>&1 || true
  if [ -n "$own" ]; then rm -rf "$dir"; fi
}
trap cleanup EXIT

summary=()
for p in "${patterns[@]}"; do
  rw=${p%%:*} bs=${p#*:}
  bash "$lab" stop "$dir/c" >/dev/null 2>&1 || true
  bash "$lab" start "$dir/c" >/dev/null
  conf=$dir/c/ceph.conf
  if [ -n "$cpu" ]; then
    # Every thread of each daemon (taskset -a), then the same read back for the record.
    daemons=$(pgrep -f -- "-c $conf ")
    for pid in $daemons; do taskset -a -p -c "$cpu" "$pid" >/dev/null; done
    placed=()
    for pid in $daemons; do
      placed+=("$(cat "/proc/$pid/comm") on $(taskset -c -p "$pid" | sed 's/.*: //')")
    done
  fi
  rbd -c "$conf" create --size "$image" rbd/bench
  # Written once, so reads read data the OSD holds, not holes it answers without a lookup.
  rbd -c "$conf" bench --io-type write --io-size 4M --io-threads 4 --io-total "$image" \
    --io-pattern seq rbd/bench >/dev/null
  args=(ceph-rbd -c pool=rbd -c image=bench -c "conf=$conf" --rw "$rw" --bs "$bs"
    --iodepth 16 --poll-us 0 --seconds "$seconds" ${client[@]+"${client[@]}"} --rbd-bench
    ${extra[@]+"${extra[@]}"})
  if ! warm=$(${pin[@]+"${pin[@]}"} bash "$here/pairs.sh" 1 "${args[@]}" 2>&1); then
    echo "$0: $rw $bs: the uncounted first pair failed:" >&2
    echo "$warm" >&2
    exit 1
  fi
  echo "== $rw $bs"
  if [ -n "$cpu" ]; then
    printf -v list '%s, ' "${placed[@]}"
    echo "one CPU: ${list}every bench run on $cpu"
  fi
  out=$(${pin[@]+"${pin[@]}"} bash "$here/pairs.sh" "$n" "${args[@]}")
  echo "$out"
  fair=$(sed -n 's/^median ratio \([0-9.]*\) of rbd-fair .*/\1/p' <<<"$out")
  tool=$(sed -n 's/^median ratio \([0-9.]*\) of rbd bench .*/\1/p' <<<"$out")
  summary+=("$rw $bs: median ${fair:-?} of rbd-fair, ${tool:-?} of rbd bench over $n pairs")
  bash "$lab" stop "$dir/c" >/dev/null
done
echo "== summary"
printf '%s\n' "${summary[@]}"
