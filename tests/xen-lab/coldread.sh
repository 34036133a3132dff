# Sourced by the guest scripts (run.sh puts it in the guest's initramfs as /coldread.sh).
# coldread NAME [PATH]: a cold 256 MiB read of /dev/NAME (or PATH), timed with the guest's
# clock. It prints `GUEST: NAME dd-read bytes=268435456 start=S end=E` only when dd exited 0
# having read 256 whole 1 MiB blocks ("256+0 records in": busybox's dd reports records, not
# bytes); anything else prints `GUEST: NAME dd-read-failed` with dd's status and messages,
# which no check and no speed figure takes for a read. It first drops the page cache through
# $DROP_CACHES (default /proc/sys/vm/drop_caches; a test elsewhere points it at a scratch file).
coldread() {
  { echo 3 >"${DROP_CACHES:-/proc/sys/vm/drop_caches}"; } 2>/dev/null
  s=$(cut -d' ' -f1 /proc/uptime)
  dd if="${2:-/dev/$1}" of=/dev/null bs=1M count=256 2>"${TMPDIR:-/tmp}/coldread.err"; r=$?
  e=$(cut -d' ' -f1 /proc/uptime)
  # Whole blocks read, if no read came back short.
  b=$(sed -n 's/^\([0-9][0-9]*\)+0 records in$/\1/p' "${TMPDIR:-/tmp}/coldread.err" | awk '{ printf "%d", $1 * 1048576 }')
  if [ "$r" = 0 ] && [ "$b" = 268435456 ]; then
    echo "GUEST: $1 dd-read bytes=$b start=$s end=$e"
  else
    echo "GUEST: $1 dd-read-failed exit=$r bytes=${b:-unknown}"
    sed "s/^/GUEST: $1 dd: /" "${TMPDIR:-/tmp}/coldread.err"
  fi
}
