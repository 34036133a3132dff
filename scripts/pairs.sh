#!/usr/bin/env bash
# Same-run pairs: runs `xen-disk-host bench ARGS --json` N times. Each run measures the
# plugin and then its reference (the first of --fio-nbd, --nbdkit, --rbd-bench, --qemu-img
# the arguments ask for, else memcpy), so plugin and reference alternate over the N runs
# and each pair shares the machine's state of the moment. Prints every pair with its ratio,
# then the median ratio, its range and the median figures. The README's medians are this.
# With --fio-nbd and --rbd-bench the pair's reference is the fair one (a libnbd or librbd
# client writing fresh data on every request, measured right after the plugin or right
# before it, see below), and each pair line also gives the engine's own tool (fio, rbd
# bench) with its ratio, then a second median line for it.
#
# Beside a fair reference the order within a pair alternates: odd pairs run the plugin
# first, even pairs the reference (`bench --fair-first`), so that a drift within a run (an
# OSD filling up as it is written, a server warming up) favours neither side; each such pair
# line ends in "fair first", and a line after the medians gives the median ratio of each order.
# PAIRS_ORDER=fixed keeps the plugin first in every pair, as the README's older sets were.
# Beside a fair reference each pair line also gives the CPU time per request of each side's
# process ("cpu P / R us per request"), and a last line the medians, with the plugin's client
# side (and simulated guest) and the reference's submitting thread.
#
# Usage: scripts/pairs.sh N BENCH-ARGS...
#   e.g. scripts/pairs.sh 14 nbd-client -c uri=nbd+unix:///?socket=S --rw randread --bs 4k --fio-nbd
# The binary is $XEN_DISK_HOST, else target/release/xen-disk-host beside this script.
set -euo pipefail
n=${1:-}
case "$n" in '' | *[!0-9]* | 0)
  echo "usage: $0 N BENCH-ARGS...   (N: how many runs, at least 1)" >&2
  exit 2 ;;
esac
shift
case "${PAIRS_ORDER:-alternate}" in
  alternate | fixed) ;;
  *) echo "PAIRS_ORDER=$PAIRS_ORDER: must be alternate or fixed" >&2; exit 2 ;;
esac
host=${XEN_DISK_HOST:-$(cd "$(dirname "$0")/.." && pwd)/target/release/xen-disk-host}
[ -x "$host" ] || { echo "$host: no such program (build it or set XEN_DISK_HOST)" >&2; exit 2; }

# The reference's JSON field (IOPS where it reports them, like the plugin's) and its name;
# field2/name2: the engine's own tool beside a fair reference.
field=memcpy_mbps unit=mbps name=memcpy field2='' name2='' fair=''
for a in "$@"; do
  case "$a" in
    --fio-nbd | --fio-nbd=*)
      field=nbd_fair_iops unit=iops name=nbd-fair field2=fio_nbd_iops name2=fio-nbd fair=1
      break ;;
    --nbdkit) field=nbdkit_iops unit=iops name=nbdkit; break ;;
    --rbd-bench)
      field=rbd_fair_iops unit=iops name=rbd-fair field2=rbd_bench_iops name2="rbd bench" fair=1
      break ;;
    --qemu-img | --qemu-img=*) field=qemu_img_mbps unit=mbps name=qemu-img; break ;;
  esac
done
# A fair reference's JSON prefix (rbd_fair, nbd_fair), for its CPU figures.
cpu_ref=${fair:+${field%_iops}}
if [ "${PAIRS_ORDER:-alternate}" = fixed ]; then fair=''; fi

# The number after "KEY": in a flat JSON object.
num() { sed -n "s/.*\"$1\":\(-\{0,1\}[0-9.]*\).*/\1/p" <<<"$2"; }
# ratio P R: P/R with three decimals, or "inf" when R is not positive.
ratio() { awk -v p="$1" -v r="$2" 'BEGIN { if (r > 0) printf "%.3f", p / r; else print "inf" }'; }

ratios=() plugins=() refs=() ratios2=() refs2=() first_p=() first_f=()
# CPU µs per request beside a fair reference: the plugin's process, its client side, its
# simulated guest (ring runs), the reference's process and its submitting thread.
cpu_p=() cpu_pc=() cpu_g=() cpu_r=() cpu_rc=()
for i in $(seq 1 "$n"); do
  order=()
  [ -n "$fair" ] && [ $((i % 2)) = 0 ] && order=(--fair-first)
  out=$("$host" bench "$@" "${order[@]}" --json) || { echo "pair $i: bench failed" >&2; exit 1; }
  p=$(num "$unit" "$out") r=$(num "$field" "$out")
  if [ -z "$p" ] || [ -z "$r" ]; then
    echo "pair $i: no \"$unit\" or \"$field\" in the bench's output: $out" >&2
    exit 1
  fi
  q=$(ratio "$p" "$r")
  [ "$q" = inf ] && { echo "pair $i: the reference measured $r" >&2; exit 1; }
  line=$(printf 'pair %d: plugin %s %s, %s %s %s, ratio %s' "$i" "$p" "$unit" "$name" "$r" "$unit" "$q")
  if [ -n "$field2" ]; then
    r2=$(num "$field2" "$out")
    q2=$(ratio "$p" "${r2:-0}")
    [ "$q2" = inf ] && { echo "pair $i: $name2 measured ${r2:-nothing}" >&2; exit 1; }
    line+=$(printf '; %s %s %s, ratio %s' "$name2" "$r2" "$unit" "$q2")
    ratios2+=("$q2") refs2+=("$r2")
  fi
  if [ -n "$cpu_ref" ]; then
    a=$(num cpu_us_per_op "$out") b=$(num "${cpu_ref}_cpu_us_per_op" "$out")
    if [ -n "$a" ] && [ -n "$b" ]; then
      line+=$(printf '; cpu %s / %s us per request' "$a" "$b")
      cpu_p+=("$a") cpu_r+=("$b")
      cpu_pc+=("$(num client_cpu_us_per_op "$out")") cpu_rc+=("$(num "${cpu_ref}_client_cpu_us_per_op" "$out")")
      g=$(num guest_cpu_us_per_op "$out")
      [ -n "$g" ] && cpu_g+=("$g")
    fi
  fi
  if [ ${#order[@]} -gt 0 ]; then
    line+='; fair first' first_f+=("$q")
  else
    first_p+=("$q")
  fi
  echo "$line"
  ratios+=("$q") plugins+=("$p") refs+=("$r")
done

# median FORMAT VALUE...: the middle value, or the mean of the two middle ones.
median() { local f=$1; shift; printf '%s\n' "$@" | sort -g | awk -v f="$f" '{ v[NR] = $1 } END {
  if (NR % 2) printf f, v[(NR + 1) / 2]; else printf f, (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
fig=%.0f; [ "$unit" = mbps ] && fig=%.1f
# summary NAME RATIOS... -- REFS...: the median line for one reference.
summary() {
  local who=$1; shift
  local rs=() fs=()
  while [ "$1" != -- ]; do rs+=("$1"); shift; done; shift
  fs=("$@")
  local lo hi
  lo=$(printf '%s\n' "${rs[@]}" | sort -g | head -1)
  hi=$(printf '%s\n' "${rs[@]}" | sort -g | tail -1)
  echo "median ratio $(median %.3f "${rs[@]}") of $who over $n pairs (range $lo-$hi);" \
    "median plugin $(median "$fig" "${plugins[@]}") $unit, $who $(median "$fig" "${fs[@]}") $unit"
}
summary "$name" "${ratios[@]}" -- "${refs[@]}"
[ -n "$field2" ] && summary "$name2" "${ratios2[@]}" -- "${refs2[@]}"
if [ ${#first_f[@]} -gt 0 ]; then
  echo "by order: plugin first median $(median %.3f "${first_p[@]}") over ${#first_p[@]} pairs," \
    "$name first median $(median %.3f "${first_f[@]}") over ${#first_f[@]} pairs"
fi
if [ ${#cpu_p[@]} -gt 0 ]; then
  guest=''
  [ ${#cpu_g[@]} -gt 0 ] && guest=", guest $(median %.1f "${cpu_g[@]}")"
  echo "median cpu per request: plugin $(median %.1f "${cpu_p[@]}") us" \
    "(client side $(median %.1f "${cpu_pc[@]}")$guest), $name $(median %.1f "${cpu_r[@]}") us" \
    "(submitting thread $(median %.1f "${cpu_rc[@]}"))"
fi
exit 0
