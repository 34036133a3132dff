# Sourced by the guest scripts (run.sh puts it in the guest's initramfs as /coldread.sh).
# coldread NAME MIB [PATH]: a cold read of MIB MiB from /dev/NAME (or PATH), timed with the
# guest's clock. It prints `GUEST: NAME dd-read bytes=B start=S end=E` only when dd exited 0
# having read MIB whole 1 MiB blocks ("MIB+0 records in": busybox's dd reports records, not
# bytes); anything else prints `GUEST: NAME dd-read-failed` with dd's status and messages,
# which no check and no speed figure takes for a read. It first drops the page cache through
# $DROP_CACHES (default /proc/sys/vm/drop_caches; a test elsewhere points it at a scratch file).
coldread() {
  err=${TMPDIR:-/tmp}/coldread.err
  { echo 3 >"${DROP_CACHES:-/proc/sys/vm/drop_caches}"; } 2>/dev/null
  s=$(cut -d' ' -f1 /proc/uptime)
  dd if="${3:-/dev/$1}" of=/dev/null bs=1M count="$2" 2>"$err"; r=$?
  e=$(cut -d' ' -f1 /proc/uptime)
  # Whole blocks read, if no read came back short.
  b=$(sed -n 's/^\([0-9][0-9]*\)+0 records in$/\1/p' "$err" | awk '{ printf "%d", $1 * 1048576 }')
  if [ "$r" = 0 ] && [ "$b" = $(($2 * 1048576)) ]; then
    echo "GUEST: $1 dd-read bytes=$b start=$s end=$e"
  else
    echo "GUEST: $1 dd-read-failed exit=$r bytes=${b:-unknown}"
    sed "s/^/GUEST: $1 dd: /" "$err"
  fi
}
