# Sourced by the lab's run scripts (run.sh, xl-run.sh, package-run.sh, backup-run.sh,
# crash-run.sh, bench.sh): reading a boot's log, held in $log, and counting the checks.
#
# Matching is by whole lines, from their start: a GUEST: tag matches only the guest's own
# lines (dom0 relays them as they are), a LAB: tag only dom0's line of that name. So dom0's
# `LAB: timeout waiting for 'GUEST: xvdg gone ...'`, or a console tail it prints after one,
# never passes for the line it quotes.

# The value of KEY=... on the first line that starts with TAG (then a space, `=` or the
# line's end) and has it.
value() {
  awk -v tag="$1" -v key="$2" 'index($0, tag) == 1 {
    c = substr($0, length(tag) + 1, 1); if (c != "" && c != " " && c != "=") next
    for (i = 1; i <= NF; i++) if (index($i, key "=") == 1) { print substr($i, length(key) + 2); exit }
  }' <<<"$log"
}
# The first line that starts with TAG (as for value), or nothing.
line() {
  awk -v tag="$1" 'index($0, tag) == 1 {
    c = substr($0, length(tag) + 1, 1); if (c == "" || c == " " || c == "=") { print; exit }
  }' <<<"$log"
}
has() { [ -n "$(line "$1")" ]; }
yes_if() { if has "$1"; then echo yes; else echo no; fi; }
# Whether a line starts with a match of the extended regular expression RE (for lines whose
# middle varies: `LAB: ctl s1: .* frozen`).
matches() { grep -Eq "^$1" <<<"$log"; }
# yes when A and B are numbers and A > B.
above() { [[ "$1" =~ ^[0-9]+$ && "$2" =~ ^[0-9]+$ ]] && [ "$1" -gt "$2" ] && echo yes || echo no; }

fail=0; pass=0
# check WHAT GOT WANT: passes when GOT is not empty and equals WANT.
check() { if [ -n "$2" ] && [ "$2" = "$3" ]; then echo "ok    $1"; pass=$((pass + 1)); else echo "FAIL  $1 (got '$2', want '$3')"; fail=$((fail + 1)); fi; }
# The last line of a run: NAME's counts; fails when a check failed.
summary() { echo "$1: $pass passed, $fail failed"; [ "$fail" = 0 ]; }

# `SCRIPT --checks-only LOG`: no build, no boot, the checks (the caller's `checks`) on a kept
# log. NAME is the summary's, USAGE the line a missing LOG gets.
checks_only() {
  [ -f "${2:-}" ] || { echo "usage: $3" >&2; exit 2; }
  log=$(tr -d '\r' <"$2")
  checks
  summary "$1"
  exit
}
