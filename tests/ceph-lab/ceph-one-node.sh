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
# Needs Ceph's packages: apt-get install ceph-mon ceph-osd ceph-mgr ceph-common
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

start() {
  local t; for t in monmaptool ceph-mon ceph-osd ceph-mgr ceph rbd; do
    command -v "$t" >/dev/null || { echo "ceph-one-node: $t is missing (apt-get install ceph-mon ceph-osd ceph-mgr ceph-common)" >&2; exit 1; }
  done
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
  monmaptool --create --add a "127.0.0.1:$PORT" --fsid "$fsid" "$dir/monmap" >/dev/null
  ceph-mon "${c[@]}" -i a --mkfs --monmap "$dir/monmap"
  ceph-mon "${c[@]}" -i a
  ceph "${c[@]}" osd create >/dev/null
  ceph-osd "${c[@]}" -i 0 --mkfs >/dev/null 2>&1
  ceph-osd "${c[@]}" -i 0
  ceph-mgr "${c[@]}" -i x
  local i up=; for i in $(seq 60); do
    if ceph "${c[@]}" osd stat 2>/dev/null | grep -q '1 up'; then up=1; break; fi
    sleep 1
  done
  [ -n "$up" ] || { echo "ceph-one-node: osd.0 did not come up in 60 s (logs in $dir/log)" >&2; stop; exit 1; }
  ceph "${c[@]}" osd pool create rbd 8 >/dev/null 2>&1
  rbd "${c[@]}" pool init rbd
  echo "ceph-one-node: up; use -c $dir/ceph.conf"
}

case "$cmd" in start) start ;; stop) stop ;; *) usage ;; esac
