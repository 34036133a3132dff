#!/usr/bin/env bash
# Incremental backup: copies the blocks a dirty bitmap marks from an NBD export into a copy
# of the previous backup, which then equals the export.
#
# Usage: scripts/nbd-apply-dirty.sh NBD-URI BITMAP FILE
#   NBD-URI  the snapshot's export, e.g. nbd+unix:///?socket=/run/backup.sock
#   BITMAP   the name after qemu:dirty-bitmap: (the previous snapshot's name)
#   FILE     a copy of the previous backup, written in place
# Needs nbdinfo (libnbd-bin) and nbdsh (python3-libnbd). Prints the bytes copied.
set -euo pipefail
[ $# = 3 ] || { echo "usage: $0 NBD-URI BITMAP FILE" >&2; exit 2; }
uri=$1 bitmap=$2 file=$3
[ -f "$file" ] || { echo "$file: no such file (start from a copy of the previous backup)" >&2; exit 2; }
ranges=$(nbdinfo --map="qemu:dirty-bitmap:$bitmap" "$uri" | awk '$3 % 2 == 1 { print $1, $2 }')
# nbdsh is `python3 -m nbd`; the python3 first on PATH may lack the module (a private
# Python ahead of the system's), so take the first that has it.
py=
for p in python3 /usr/bin/python3; do
  if "$p" -c 'import nbd' 2>/dev/null; then py=$p; break; fi
done
[ -n "$py" ] || { echo "no python3 with the nbd module (install python3-libnbd)" >&2; exit 2; }
# One connection for every range; reads of at most 32 MiB, the server's maximum.
RANGES=$ranges FILE=$file "$py" -m nbd -u "$uri" -c '
import os
fd = os.open(os.environ["FILE"], os.O_WRONLY)
copied = 0
for line in os.environ["RANGES"].splitlines():
    off, length = map(int, line.split())
    end = off + length
    while off < end:
        n = min(end - off, 32 << 20)
        os.pwrite(fd, h.pread(n, off), off)
        off += n
        copied += n
os.fsync(fd)
os.close(fd)
print(copied)
'
