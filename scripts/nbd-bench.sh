#!/usr/bin/env bash
# The nbd subcommand beside the reference NBD servers, measured by fio's nbd engine in one
# run: `xen-disk-host nbd file` against `nbdkit file` and `qemu-nbd -f raw` over a raw
# image, and `xen-disk-host nbd qcow2` against `qemu-nbd -f qcow2` over the same data as
# qcow2. Each round runs every server once per pattern, in an order that rotates from round
# to round, so each server meets the machine in every state; the figures are medians.
# All servers serve read-only over Unix sockets, with their default caching (the page cache).
#
# Usage: scripts/nbd-bench.sh [ROUNDS [SECONDS [SIZE_MIB]]]   (defaults: 5 rounds, 5 s, 512)
# Patterns: 4 KiB random reads at depth 32, 1 MiB sequential reads at depth 4.
# The binary is $XEN_DISK_HOST, else target/release/xen-disk-host beside this script (its
# plugins are found beside it unless XEN_DISK_PLUGIN_PATH says otherwise).
set -euo pipefail
rounds=${1:-5} secs=${2:-5} mib=${3:-512}
for v in "$rounds" "$mib"; do
  case "$v" in '' | *[!0-9]* | 0) echo "usage: $0 [ROUNDS [SECONDS [SIZE_MIB]]]" >&2; exit 2 ;; esac
done
case "$secs" in '' | *[!0-9.]* | 0) echo "usage: $0 [ROUNDS [SECONDS [SIZE_MIB]]]" >&2; exit 2 ;; esac
ms=$(awk -v s="$secs" 'BEGIN { printf "%d", s * 1000 }')
host=${XEN_DISK_HOST:-$(cd "$(dirname "$0")/.." && pwd)/target/release/xen-disk-host}
[ -x "$host" ] || { echo "$host: no such program (build it or set XEN_DISK_HOST)" >&2; exit 2; }
export XEN_DISK_PLUGIN_PATH=${XEN_DISK_PLUGIN_PATH:-$(dirname "$host")}
for t in fio nbdkit qemu-nbd qemu-img; do
  command -v "$t" >/dev/null || { echo "$t is needed (see .ci/run's PKGS)" >&2; exit 2; }
done

dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT

# Data everywhere (holes would make reads free), then the same data as qcow2.
head -c $((mib << 20)) /dev/urandom >"$dir/raw.img"
qemu-img convert -f raw -O qcow2 "$dir/raw.img" "$dir/q.qcow2"

start() { # NAME COMMAND...: starts a server on $dir/NAME.sock and waits for its socket.
  local name=$1; shift
  "$@" >"$dir/$name.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 200); do [ -S "$dir/$name.sock" ] && return 0; sleep 0.05; done
  echo "$name did not start: $(cat "$dir/$name.log")" >&2; exit 1
}
start ours-raw "$host" nbd --read-only file -c "path=$dir/raw.img" --unix "$dir/ours-raw.sock"
start nbdkit-raw nbdkit --foreground --readonly --unix "$dir/nbdkit-raw.sock" file "$dir/raw.img"
start qemu-raw qemu-nbd --persistent --shared=8 --read-only -f raw --socket "$dir/qemu-raw.sock" "$dir/raw.img"
start ours-qcow2 "$host" nbd --read-only qcow2 -c "path=$dir/q.qcow2" --unix "$dir/ours-qcow2.sock"
start qemu-qcow2 qemu-nbd --persistent --shared=8 --read-only -f qcow2 --socket "$dir/qemu-qcow2.sock" "$dir/q.qcow2"

# fio PATTERN SERVER: prints IOPS (randread) or MB/s (read).
measure() {
  local rw bs depth field
  case "$1" in
    randread) rw=randread bs=4k depth=32 field=8 ;;
    read) rw=read bs=1m depth=4 field=7 ;;
  esac
  fio --name=nbd-bench --ioengine=nbd --uri="nbd+unix:///?socket=$dir/$2.sock" --rw=$rw \
    --bs=$bs --iodepth=$depth --size=$((mib << 20)) --runtime="$ms"ms --time_based \
    --output-format=terse --terse-version=3 | awk -F';' -v f="$field" -v rw="$rw" '
      /^3;/ { if (rw == "read") printf "%.1f\n", $f / 1000 * 1.024; else print $f }'
}

median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END {
  if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

declare -A runs
raw=(ours-raw nbdkit-raw qemu-raw) qcow=(ours-qcow2 qemu-qcow2)
for r in $(seq 1 "$rounds"); do
  for pattern in randread read; do
    for group in raw qcow; do
      declare -n servers=$group
      n=${#servers[@]}
      line="round $r $pattern:"
      for i in $(seq 0 $((n - 1))); do
        s=${servers[$(((i + r) % n))]}
        v=$(measure "$pattern" "$s")
        [ -n "$v" ] || { echo "fio printed no figure for $s" >&2; exit 1; }
        runs[$pattern,$s]+="$v "
        line+=" $s $v"
      done
      echo "$line"
    done
  done
done

echo "medians over $rounds rounds of $secs s (randread 4k depth 32: IOPS; read 1M depth 4: MB/s):"
for pattern in randread read; do
  for group in raw qcow; do
    declare -n servers=$group
    ours=$(median ${runs[$pattern,${servers[0]}]})
    best=0 bestname=
    text="$pattern ${servers[0]} $ours"
    for s in "${servers[@]:1}"; do
      m=$(median ${runs[$pattern,$s]})
      text+=", $s $m"
      if awk -v a="$m" -v b="$best" 'BEGIN { exit !(a > b) }'; then best=$m bestname=$s; fi
    done
    echo "$text; ratio to $bestname $(awk -v a="$ours" -v b="$best" 'BEGIN { printf "%.2f", a / b }')"
  done
done
