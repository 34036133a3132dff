#!/usr/bin/env bash
# Provokes the moment the nbd-client reader thread stands in for the ring thread and is
# preempted while it holds the connection's replies: N runs of `bench nbd-client` with one
# connection, the ring thread and simulated guest on CPU 0 (--client-cpu 0) and the reader
# thread moved onto that CPU at nice 19 as soon as it exists. Counts the runs whose ring
# thread gave the replies up ("the plugin's completion descriptor stays readable with
# nothing to take"). Before the ring thread's take waited for a standing-in reader, 5 runs
# of 1 MiB writes in 28 did; after, none in 62 (46 of 1 MiB writes, 10 of 1 MiB reads, 6 of
# 4 KiB random writes).
#
# Usage: scripts/nbd-stand-in-stress.sh N SOCKET [RW [BS]]   (default: write 1M)
#   SOCKET: an NBD server's Unix socket, e.g. from `nbdkit -U SOCKET -f memory 1G`.
# The binary is $XEN_DISK_HOST, else target/release/xen-disk-host beside this script.
set -euo pipefail
n=${1:-} socket=${2:-} rw=${3:-write} bs=${4:-1M}
case "$n" in '' | *[!0-9]* | 0)
  echo "usage: $0 N SOCKET [RW [BS]]   (N: how many runs, at least 1)" >&2
  exit 2 ;;
esac
[ -S "$socket" ] || { echo "$socket: not a Unix socket (start an NBD server there)" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
host=${XEN_DISK_HOST:-$root/target/release/xen-disk-host}
[ -x "$host" ] || { echo "$host: no such program (build it or set XEN_DISK_HOST)" >&2; exit 2; }
export XEN_DISK_PLUGIN_PATH=${XEN_DISK_PLUGIN_PATH:-$(dirname "$host")}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
gave_up=0
for i in $(seq 1 "$n"); do
  "$host" bench nbd-client -c "uri=nbd+unix:///?socket=$socket" -c connections=1 \
    --rw "$rw" --bs "$bs" --iodepth 32 --poll-us 0 --seconds 3 --client-cpu 0 >"$out" 2>&1 &
  pid=$!
  tid=''
  for _ in $(seq 1 50); do
    tid=$(grep -l '^nbd-reader-0$' /proc/$pid/task/*/comm 2>/dev/null | head -1 | cut -d/ -f5) || true
    [ -n "$tid" ] && break
    sleep 0.02
  done
  if [ -n "$tid" ]; then
    taskset -pc 0 "$tid" >/dev/null
    renice -n 19 -p "$tid" >/dev/null
  fi
  status=0
  wait "$pid" || status=$?
  [ "$status" = 0 ] || { echo "run $i: bench failed ($status)" >&2; cat "$out" >&2; exit 1; }
  if grep -q "stays readable with nothing to take" "$out"; then
    gave_up=$((gave_up + 1))
    echo "run $i: reader ${tid:-not found}, the ring thread gave the replies up"
  else
    echo "run $i: reader ${tid:-not found}, replies taken to the end"
  fi
done
echo "$gave_up of $n runs gave the replies up"
