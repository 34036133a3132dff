#!/usr/bin/env bash
# Same-boot A/B of xen-disk-host against Linux's in-kernel blkback, fio in the guest (one lab
# boot; bench-dom0.sh and bench-guest.sh are its two sides). Prints every pair, the median of
# the per-pair ratios ours / kernel, what each backend negotiated, and dom0's CPU time per
# request; then checks that the table is complete and sane (never how fast: speed is not
# a pass/fail here). LAB_RELEASE picks the release, as for xen-lab.sh.
# Usage: tests/xen-lab/bench.sh                    (from the repository root)
#        tests/xen-lab/bench.sh --checks-only LOG  (the checks and table on a kept log,
#                                                  $OUT/lab.log, default /tmp/xen-disk-bench)
# Knobs (environment): BENCH_PAIRS (5), BENCH_SECS (fio seconds per run, 3),
# BENCH_FILE ("rr rw sr sw"), BENCH_NULL ("rr"), BENCH_PROFILE ("rr sr": one strace -c run
# each on ours, after the pairs), BENCH_OURS_ARGS (extra `connect` options for ours),
# BENCH_PLUGIN (file: the plugin serving ours over the tmpfs image; mmap to compare).
# Workloads: rr 4 KiB random read depth 32, rw 4 KiB random write depth 32, sr 1 MiB
# sequential read depth 8, sw 1 MiB sequential write depth 8; all O_DIRECT (fio libaio).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${OUT:-${TMPDIR:-/tmp}/xen-disk-bench}

# The table: per set and workload, every pair (kernel, ours, ratio), then the medians and
# the per-request costs. Reads the log on stdin; fails on nothing (the checks do).
table() {
  awk '
  function med(list,   n, a, i, j, t) {
    n = split(list, a, " "); if (n == 0) return "-"
    for (i = 2; i <= n; i++) { t = a[i] + 0; for (j = i - 1; j >= 1 && a[j] + 0 > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
    return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
  }
  function kv(s, k,   i, f, n) { n = split(s, f, " "); for (i = 1; i <= n; i++) if (index(f[i], k "=") == 1) return substr(f[i], length(k) + 2); return "" }
  /^LAB: mark / { tag = $3; m[tag, $4, "busy"] = kv($0, "busy"); m[tag, $4, "own"] = kv($0, "own"); m[tag, $4, "csw"] = kv($0, "csw"); m[tag, $4, "evt"] = kv($0, "evt") }
  /^GUEST: bench end / { gevt[$4] = kv($0, "evt") }
  /^GUEST: bench result / { tag = $4; rc[tag] = kv($0, "rc"); kb[tag] = kv($0, "kb"); ms[tag] = kv($0, "ms"); ios[tag] = kv($0, "ios"); ends[++n] = tag }
  /^LAB: bench conf / { pairs = kv($0, "pairs") + 0 }
  /^LAB: bench keys / { keys[$4] = $0 }
  /^LAB: strace / { split($3, t, "."); if ($4 != "total") sc[t[3]] = sc[t[3]] sprintf(" %s=%s", $4, kv($0, "calls")); else tot[t[3]] = kv($0, "calls"); prof[t[3]] = $3 }
  END {
    name["rr"] = "4k randread d32 (IOPS)"; name["rw"] = "4k randwrite d32 (IOPS)"
    name["sr"] = "1M seqread d8 (MB/s)"; name["sw"] = "1M seqwrite d8 (MB/s)"
    for (i = 1; i <= n; i++) {
      split(ends[i], t, "."); if (t[1] == "profile") continue
      k = t[1] "." t[2]; if (!(k in seen)) { seen[k] = 1; order[++no] = k }
      tag = ends[i]; d = (ms[tag] > 0) ? ms[tag] : 1
      # Requests from the bytes and the block size (the IOPS fio prints are whole numbers: a 1 MiB run
      # at under one a second would count none).
      r = kb[tag] / ((t[2] ~ /^s/) ? 1024 : 4); if (r < 1) r = 1
      v = (t[2] ~ /^s/) ? kb[tag] * 1024 / 1e6 / (d / 1000) : r / (d / 1000)
      val[k, t[3], t[4]] = v
      busy = (m[tag, "end", "busy"] - m[tag, "begin", "busy"]) * 10000 / r
      own = (m[tag, "end", "own"] - m[tag, "begin", "own"]) / 1000 / r
      csw = (m[tag, "end", "csw"] - m[tag, "begin", "csw"]) / r
      evt = (m[tag, "end", "evt"] - m[tag, "begin", "evt"]) / r
      cost[k, t[4], "busy"] = cost[k, t[4], "busy"] " " busy; cost[k, t[4], "own"] = cost[k, t[4], "own"] " " own
      cost[k, t[4], "csw"] = cost[k, t[4], "csw"] " " csw; cost[k, t[4], "evt"] = cost[k, t[4], "evt"] " " evt
      cost[k, t[4], "gevt"] = cost[k, t[4], "gevt"] " " gevt[tag] / r
    }
    for (o = 1; o <= no; o++) {
      k = order[o]; split(k, t, "."); ratios = ""
      printf "%s, %s (kernel: %s; ours: %s):\n", name[t[2]], t[1] == "file" ? "128 MiB image in dom0 tmpfs" : "no storage", t[1] == "file" ? "blkback over loop" : "blkback over null_blk", t[1] == "file" ? "file" : "discard"
      printf "  pair   kernel     ours  ours/kernel\n"
      for (p = 1; p <= pairs; p++) {
        a = val[k, p, "kernel"]; b = val[k, p, "ours"]
        if (a == "" || b == "") { printf "  %4d  (missing)\n", p; continue }
        ratio = a > 0 ? b / a : 0; ratios = ratios " " ratio
        printf "  %4d %8.1f %8.1f  %5.2f\n", p, a, b, ratio
      }
      printf "  median ours/kernel %.2f\n", med(ratios)
      printf "  per request, median: dom0 busy %.1f us / %.1f us, serving threads %.1f us / %.1f us, their switches %.2f / %.2f, notifications to dom0 %.2f / %.2f, to the guest %.2f / %.2f (kernel / ours)\n",
        med(cost[k, "kernel", "busy"]), med(cost[k, "ours", "busy"]), med(cost[k, "kernel", "own"]), med(cost[k, "ours", "own"]),
        med(cost[k, "kernel", "csw"]), med(cost[k, "ours", "csw"]), med(cost[k, "kernel", "evt"]), med(cost[k, "ours", "evt"]),
        med(cost[k, "kernel", "gevt"]), med(cost[k, "ours", "gevt"])
      printf "BENCH %s median=%.2f\n", k, med(ratios)
    }
    split("51728 kernel/loop 51744 ours/file 51760 kernel/null_blk 51776 ours/discard", dn, " ")
    for (i = 1; i <= 8; i += 2) if (dn[i] in keys) { s = keys[dn[i]]; sub(/^LAB: bench keys [0-9]+ /, "", s); printf "keys %-15s %s\n", dn[i + 1], s }
    for (w in prof) {
      tag = prof[w]; r = kb[tag] / ((w ~ /^s/) ? 1024 : 4); if (r < 1) r = 1
      printf "system calls of ours, %s (strace -c, one run; %d requests): %.2f per request;%s\n", w, r, tot[w] / r, sc[w]
    }
  }'
}

. "$here/checks-lib.sh"
# Complete and sane, not fast: every run of every pair ended well with requests counted and
# dom0's marks around it, every disk connected, every median there.
checks() {
  local conf pairs sets w p b tag endl missing bad
  conf=$(grep -m1 '^LAB: bench conf ' <<<"$log" || true)
  check "dom0: no wait timed out" "$(grep -c "^LAB: timeout waiting" <<<"$log" || true)" 0
  check "dom0: both xen-disk-host ran to the end" "$(grep -c '^LAB: bench: a xen-disk-host exited early' <<<"$log" || true)" 0
  pairs=$(sed -n 's/.* pairs=\([0-9]*\).*/\1/p' <<<"$conf")
  check "the run names its pairs (>= 1)" "$([ "${pairs:-0}" -ge 1 ] && echo yes)" yes
  for id in 51728 51744 51760 51776; do
    check "disk $id connected (state 4)" "$(grep "^LAB: bench keys $id " <<<"$log" | grep -o 'state=[0-9]*')" state=4
  done
  sets="file:$(sed -n 's/.* file=\([^ ]*\).*/\1/p' <<<"$conf") null:$(sed -n 's/.* null=\([^ ]*\).*/\1/p' <<<"$conf")"
  for s in $sets; do
    for w in $(tr , ' ' <<<"${s#*:}"); do
      missing=0; bad=0
      for p in $(seq 1 "${pairs:-0}"); do
        for b in kernel ours; do
          tag=${s%%:*}.$w.$p.$b
          endl=$(grep -m1 "^GUEST: bench result $tag " <<<"$log" || true)
          if [ -z "$endl" ] || ! grep -q "^GUEST: bench end $tag " <<<"$log" \
            || ! grep -q "^LAB: mark $tag begin " <<<"$log" || ! grep -q "^LAB: mark $tag end " <<<"$log"; then
            missing=$((missing + 1))
          elif ! grep -qE ' rc=0( |$)' <<<"$endl" || grep -qE ' (kb|ms)=0( |$)' <<<"$endl"; then
            bad=$((bad + 1))
          fi
        done
      done
      check "${s%%:*} $w: every run of $pairs pairs there" "$missing" 0
      check "${s%%:*} $w: every run exited 0 with requests served" "$bad" 0
      check "${s%%:*} $w: median ratio computed" "$(grep -c "^BENCH ${s%%:*}.$w median=[0-9]" <<<"$tab")" 1
    done
  done
  for w in $(sed -n 's/.* profile=\([^ ]*\).*/\1/p' <<<"$conf" | tr , ' '); do
    check "profile $w: system calls counted" "$(grep -c "^LAB: strace profile.file.$w.1.ours total calls=[1-9]" <<<"$log")" 1
  done
}

if [ "${1:-}" = "--checks-only" ]; then
  [ -f "${2:-}" ] || { echo "usage: $0 --checks-only LOG (a bench boot's log, e.g. $out/lab.log)" >&2; exit 2; }
  log=$(tr -d '\r' <"$2")
  tab=$(table <<<"$log")
  echo "$tab" | grep -v '^BENCH '
  checks
  summary "xen-lab bench"
  exit
fi

lab=${XEN_LAB:-$here/xen-lab.sh}
cargo build --release --manifest-path "$root/Cargo.toml" -p xen-disk-host -p xen-disk-plugin-file -p xen-disk-plugin-discard -p xen-disk-plugin-mmap >/dev/null
t="$root/target/release"
fio=$(command -v fio) || { echo "xen-lab bench: fio is missing (apt-get install fio)"; exit 1; }
strace=$(command -v strace) || { echo "xen-lab bench: strace is missing (apt-get install strace)"; exit 1; }
ours_plugin=${BENCH_PLUGIN:-file}
[ -f "$t/lib$ours_plugin.so" ] || { echo "xen-lab bench: BENCH_PLUGIN=$ours_plugin: no $t/lib$ours_plugin.so"; exit 1; }
OUT=$out bash "$lab" build "$t/xen-disk-host" "$t/lib$ours_plugin.so" "$t/libdiscard.so" "$strace" \
  module:loop module:xen-blkback module:null_blk "guest:$fio" >/dev/null
cat >"$out/domU/bench.conf" <<EOF
PAIRS=${BENCH_PAIRS:-5}
SECS=${BENCH_SECS:-3}
FILE_WORKLOADS="${BENCH_FILE-rr rw sr sw}"
NULL_WORKLOADS="${BENCH_NULL-rr}"
PROFILE_WORKLOADS="${BENCH_PROFILE-rr sr}"
BENCH_OURS_ARGS="${BENCH_OURS_ARGS:-}"
OURS_PLUGIN=$ours_plugin
EOF
cp "$out/domU/bench.conf" "$out/dom0/bench.conf"

start=$(date +%s)
log=$(LAB_TIMEOUT=${LAB_TIMEOUT:-2400} OUT=$out bash "$lab" run "$here/bench-dom0.sh" "$here/bench-guest.sh" | tr -d '\r')
boot=$(( $(date +%s) - start ))
echo "$log" >"$out/lab.log"
grep -E '^(LAB: bench|LAB: timeout|LAB: console|LAB: log|GUEST: bench (disk|fio|fio-error))' <<<"$log" || true
tab=$(table <<<"$log")
echo "$tab" | grep -v '^BENCH '
checks
echo "xen-lab bench: release ${LAB_RELEASE:-12}: boot took ${boot}s (log: $out/lab.log; bench.sh --checks-only checks it again)"
summary "xen-lab bench"
