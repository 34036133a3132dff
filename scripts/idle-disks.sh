#!/usr/bin/env bash
# The cost of many idle disks: `serve --sim` with N `discard` (or `file`: 16 MiB sparse
# images) disks (simulated guests of 8 disks each, one queue), idle once connected; prints, per group of threads (by name), how
# many there are and the CPU they used over SECS seconds, then the process's RSS and file
# descriptors. The simulated guests and xenstored live in the same process: their groups
# (`sim-*` and the unnamed `xen-disk-host` threads) are not the daemon's.
#
# Usage: scripts/idle-disks.sh N [SECS [PLUGIN]]   (default 200 disks, 30 s, discard)
# Thread counts are those at the end of the SECS window.
# The binary is $XEN_DISK_HOST, else target/release/xen-disk-host beside this script; the
# plugins are looked for beside it unless XEN_DISK_PLUGIN_PATH says.
set -euo pipefail
n=${1:-200}; secs=${2:-30}; plugin=${3:-discard}
case "$n$secs" in *[!0-9]*) echo "usage: $0 [N] [SECS [discard|file]]   (whole numbers)" >&2; exit 2 ;; esac
[ "$n" -ge 1 ] && [ "$secs" -ge 1 ] || { echo "usage: $0 [N] [SECS [discard|file]]   (at least 1 each)" >&2; exit 2; }
case "$plugin" in discard | file) ;; *) echo "usage: $0 [N] [SECS [discard|file]]   (PLUGIN: discard or file)" >&2; exit 2 ;; esac
host=${XEN_DISK_HOST:-$(cd "$(dirname "$0")/.." && pwd)/target/release/xen-disk-host}
[ -x "$host" ] || { echo "$host: no such program (build it or set XEN_DISK_HOST)" >&2; exit 2; }
export XEN_DISK_PLUGIN_PATH=${XEN_DISK_PLUGIN_PATH:-$(dirname "$host")}
dir=$(mktemp -d); trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$dir"' EXIT
letters=(b c d e f g h i)
for i in $(seq 0 $((n - 1))); do
  if [ "$plugin" = file ]; then
    truncate -s 16M "$dir/d$i.img"
    key="path = \"$dir/d$i.img\""
  else
    key='size = "16M"'
  fi
  printf '[[disk]]\ndomain = "g%d"\nplugin = "%s"\nvbd = "xvd%s"\n[disk.plugin-config]\n%s\n\n' \
    $((i / 8)) "$plugin" "${letters[$((i % 8))]}" "$key"
done >"$dir/disks.toml"
"$host" serve --sim --config "$dir/disks.toml" --control "$dir/c.sock" --xenstore-socket "$dir/xs.sock" >"$dir/log" 2>&1 &
pid=$!
# Connected when every simulated guest said so (serve gives up itself if they do not).
while [ "$(grep -c ' connected /local/domain/' "$dir/log")" -lt "$n" ]; do
  kill -0 "$pid" 2>/dev/null || { echo "serve exited:"; tail -5 "$dir/log"; exit 1; }
  sleep 1
done
sleep 5
# Per thread name (trailing digits and dashes dropped): threads, and utime+stime in ticks.
snap() {
  for t in /proc/"$pid"/task/*; do
    name=$(sed 's/[0-9-]*$//' "$t/comm" 2>/dev/null) || continue
    # comm may hold spaces: count fields from the end of "(comm)".
    rest=$(sed 's/^.*) //' "$t/stat"); read -r -a f <<<"$rest"
    echo "$name ${f[11]} ${f[12]}"
  done | awk '{ c[$1]++; s[$1] += $2 + $3 } END { for (k in c) print k, c[k], s[k] }' | sort
}
hz=$(getconf CLK_TCK)
snap >"$dir/a"; sleep "$secs"; snap >"$dir/b"
echo "$n idle $plugin disks, over $secs s:"
join "$dir/a" "$dir/b" | awk -v s="$secs" -v hz="$hz" \
  '{ printf "  %-18s threads %5d  CPU %6.2f%% of a core\n", $1, $4, ($5 - $3) * 100 / hz / s }'
echo "  process: $(grep -E '^(VmRSS|Threads)' /proc/$pid/status | tr -s ' \t' ' ' | paste -sd ' ')," \
  "$(ls /proc/$pid/fd | wc -l) file descriptors"
