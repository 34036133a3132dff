#!/usr/bin/env bash
# A throwaway one-node Ceph cluster on loopback, for the ceph-rbd plugin's tests
# (tests/ceph_rbd.rs): one monitor (127.0.0.1:40789), one manager and one OSD whose store is
# memory (memstore, 2 GiB), no cephx, pools of one replica, and the pool `rbd` ready for
# images. Everything it makes lives in DIR; it starts in a few seconds.
#
#   ceph-one-node.sh start DIR   make and start the cluster; then rbd -c DIR/ceph.conf ...
#                                (DIR/osd.0.pid holds the OSD's pid)
#   ceph-one-node.sh stop DIR    stop every daemon started in DIR (TERM, then KILL)
#
# Needs Ceph's packages and ip: apt-get install ceph-mon ceph-osd ceph-mgr ceph-common iproute2
#
# Every daemon binds 127.0.0.1. A sandbox may run the tests in a network namespace whose
# loopback is down (Ceph then fails at once, saying only in its log that it found no address
# in 127.0.0.0/8); as root the script brings loopback up, otherwise it says so and stops.
# A failed step is named on stderr with the last lines of the daemons' logs.
set -euo pipefail
PORT=40789

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
cmd=$1; dir=$2

daemons_signal() { local sig=$1 f
  for f in "$dir"/*.pid; do [ -f "$f" ] && kill "-$sig" "$(cat "$f")" 2>/dev/null; done; return 0
}
stop() {
  daemons_signal TERM
  local i; for i in $(seq 20); do
    local alive=; for f in "$dir"/*.pid; do [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null && alive=1; done
    [ -z "$alive" ] && return 0; sleep 0.5
  done
  daemons_signal KILL
}

# Says which step failed and what the daemons logged last, stops what was started, exits 1.
fail() {
  echo "ceph-one-node: $1" >&2
  local f; for f in "$dir"/log/*.log; do
    [ -s "$f" ] || continue
    echo "--- last lines of $f" >&2; tail -n 8 "$f" >&2
  done
  stop; exit 1
}

loopback_up() { ip -o link show dev lo 2>/dev/null | grep -q '[<,]UP[,>]'; }

ensure_loopback() {
  loopback_up && return 0
  if [ "$(id -u)" = 0 ] && ip link set dev lo up 2>/dev/null && loopback_up; then
    echo "ceph-one-node: loopback was down in this network namespace; brought it up" >&2
    return 0
  fi
  echo "ceph-one-node: the loopback interface is down and this user cannot bring it up (as root: ip link set dev lo up)" >&2
  exit 1
}

start() {
  local t; for t in monmaptool ceph-mon ceph-osd ceph-mgr ceph rbd ip; do
    command -v "$t" >/dev/null || { echo "ceph-one-node: $t is missing (apt-get install ceph-mon ceph-osd ceph-mgr ceph-common iproute2)" >&2; exit 1; }
  done
  ensure_loopback
  rm -rf "$dir"; mkdir -p "$dir"/{mon,osd,mgr,run,log}
  local fsid; fsid=$(cat /proc/sys/kernel/random/uuid)
  # Every path, socket and pid file inside DIR, so two checkouts never share anything but
  # the monitor's port.
  cat > "$dir/ceph.conf" <<CONF
[global]
fsid = $fsid
mon host = 127.0.0.1:$PORT
public network = 127.0.0.0/8
ms bind ipv4 = true
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon allow pool delete = true
# A test cluster on a nearly full disk still starts (the default refuses below 5 % free).
mon data avail crit = 1
osd crush chooseleaf type = 0
osd objectstore = memstore
memstore device bytes = $((2 << 30))
run dir = $dir/run
admin socket = $dir/run/\$name.asok
pid file = $dir/\$name.pid
log file = $dir/log/\$name.log
[mon.a]
mon data = $dir/mon
[mgr.x]
mgr data = $dir/mgr
[osd.0]
osd data = $dir/osd
CONF
  local c=(-c "$dir/ceph.conf")
  # The ceph tool waits five minutes for a monitor by default; a dead one should fail fast.
  local cli=(ceph "${c[@]}" --connect-timeout 30)
  monmaptool --create --add a "127.0.0.1:$PORT" --fsid "$fsid" "$dir/monmap" >/dev/null \
    || fail "monmaptool could not write $dir/monmap"
  ceph-mon "${c[@]}" -i a --mkfs --monmap "$dir/monmap" || fail "ceph-mon --mkfs failed"
  local out; out=$(ceph-mon "${c[@]}" -i a 2>&1) || fail "ceph-mon did not start (port $PORT taken? disk full?): $out"
  "${cli[@]}" osd create >/dev/null || fail "ceph osd create failed (the monitor is not answering)"
  out=$(ceph-osd "${c[@]}" -i 0 --mkfs 2>&1) || fail "ceph-osd --mkfs failed: $out"
  ceph-osd "${c[@]}" -i 0 2>/dev/null || fail "ceph-osd did not start"
  ceph-mgr "${c[@]}" -i x || fail "ceph-mgr did not start"
  local i up=; for i in $(seq 60); do
    if "${cli[@]}" osd stat 2>/dev/null | grep -q '1 up'; then up=1; break; fi
    sleep 1
  done
  [ -n "$up" ] || fail "osd.0 did not come up in 60 s"
  out=$("${cli[@]}" osd pool create rbd 8 2>&1) || fail "ceph osd pool create rbd failed: $out"
  rbd "${c[@]}" pool init rbd || fail "rbd pool init failed"
  echo "ceph-one-node: up; use -c $dir/ceph.conf"
}

case "$cmd" in start) start ;; stop) stop ;; *) usage ;; esac
