#!/usr/bin/env bash
# The project's Xen lab: a real Xen hypervisor booted under QEMU (software emulation, no KVM)
# with a Debian kernel as PV dom0, and a small PV guest whose own xen-blkfront talks to
# whatever block backend the test starts in dom0.
#
#   xen-lab.sh install              get what the lab needs (as root): QEMU, busybox, cpio on
#                                   this machine; release 12's Xen and kernel as packages of
#                                   this machine; release 13's fetched into the lab's cache
#   xen-lab.sh build [FILE...]      make the dom0 and guest trees under $OUT. Each FILE is
#                                   copied to /opt/xen-disk/ in dom0 with the shared libraries
#                                   it needs (see "Files from this machine" below).
#                                   module:NAME puts the release kernel's module NAME (and
#                                   those it depends on, uncompressed) in /opt/xen-disk/ as
#                                   NAME.ko; guest-module:NAME puts it at / in the guest;
#                                   deb:FILE unpacks the package FILE into dom0's root (see
#                                   "Packages" below); guest:FILE puts FILE in the guest's
#                                   /opt/xen-disk/ as FILE goes to dom0's (same launcher)
#   xen-lab.sh run DOM0 [GUEST]     boot. dom0 runs the shell file DOM0 once xenstored is up;
#                                   the guest runs the shell file GUEST at boot (as /guest.sh).
#                                   The whole serial console goes to $OUT/serial.log; its lines
#                                   holding DOM0:, GUEST: or LAB: are printed. Returns when dom0
#                                   has powered off (or after $LAB_TIMEOUT seconds, default 600)
#
# Releases (LAB_RELEASE):
#   12 (default)  Xen 4.17, Linux 6.1: Debian 12 "bookworm", the packages installed on this
#                 machine (xen-hypervisor-4.17-amd64, xen-utils-4.17, xenstore-utils,
#                 linux-image-amd64). KVER picks the kernel in /lib/modules (newest by default).
#   13            Xen 4.20, Linux 6.12: Debian 13 "trixie" packages, downloaded with apt into
#                 $LAB_CACHE and unpacked there with dpkg -x; nothing is installed on this
#                 machine. LAB13_KERNEL names the kernel package (default: the one
#                 linux-image-amd64 depends on).
#
# Files from this machine: dom0 runs the release's own userland (xl, xenstored and their
# libraries at the usual paths). What `build` is given runs on this machine's libraries
# instead, kept apart in /opt/xen-disk/lib with this machine's dynamic loader: an executable
# FILE is placed in /opt/xen-disk/bin/ and /opt/xen-disk/FILE is a launcher that starts it
# through /opt/xen-disk/ld-linux-x86-64.so.2 --library-path /opt/xen-disk/lib, so neither side
# ever loads the other's glibc. Shared objects (plugins) get their libraries in the same dir;
# kernel modules and data files are copied as they are.
#
# Packages (deb:FILE): unpacked with dpkg-deb -x at their own paths in dom0 (/usr/bin,
# /usr/lib/..., /etc/...), as an install would put them; their maintainer scripts do not run.
# Their programs and libraries load dom0's libraries where dom0 has them (the release's: a
# package built here needs glibc no newer than this machine's, which both releases have),
# and this machine's, copied into dom0's /lib/<multiarch>, for those it lacks.
#
# Needs about 3 GiB of RAM and 2 cores. QEMU runs with -accel tcg -cpu qemu64 (KVM CPU models
# fail on these machines).
set -euo pipefail

RELEASE=${LAB_RELEASE:-12}
OUT=${OUT:-${TMPDIR:-/tmp}/xen-lab}
CACHE=${LAB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/xen-disk-lab}
MULTIARCH=x86_64-linux-gnu
LOADER=/lib64/ld-linux-x86-64.so.2

die() { echo "xen-lab: $*" >&2; exit 1; }
note() { echo "xen-lab: $*" >&2; }

# --- releases ----------------------------------------------------------------------------
# Each sets XENV (Xen's version in its paths), ROOT (the tree its files come from: / for the
# machine's own packages), KVER, KDIR (the kernel's module tree) and VMLINUZ, HYPERVISOR.
release_12() {
  XENV=4.17; ROOT=/
  KVER=${KVER:-$(ls /lib/modules 2>/dev/null | sort -V | tail -1)}
  [ -n "$KVER" ] && [ -d "/lib/modules/$KVER" ] || die "release 12: no kernel in /lib/modules (run: xen-lab.sh install)"
  KDIR=/lib/modules/$KVER; VMLINUZ=/boot/vmlinuz-$KVER; HYPERVISOR=/boot/xen-$XENV-amd64.gz
}

# Debian 13 packages for dom0: the hypervisor, the toolstack and the libraries its programs
# load. A library missing here is named by `build`.
TRIXIE_PKGS="xen-hypervisor-4.20-amd64 xen-utils-4.20 xenstore-utils libxenmisc4.20 libxenstore4
  libxencall1 libxendevicemodel1 libxenevtchn1 libxenforeignmemory1 libxengnttab1 libxentoollog1
  libxentoolcore1 libxenhypfs1 libyajl2 libc6 libgcc-s1 libuuid1 zlib1g liblzma5 libzstd1"

release_13() {
  XENV=4.20; ROOT=$CACHE/trixie/root
  fetch_trixie
  KVER=$(ls "$ROOT/usr/lib/modules" 2>/dev/null | sort -V | tail -1)
  [ -n "$KVER" ] || die "release 13: the unpacked kernel has no module tree under $ROOT/usr/lib/modules"
  KDIR=$ROOT/usr/lib/modules/$KVER; VMLINUZ=$ROOT/boot/vmlinuz-$KVER; HYPERVISOR=$ROOT/boot/xen-$XENV-amd64.gz
}

# apt with its own sources, lists and package cache under $CACHE/trixie: the machine's apt
# configuration and dpkg database are neither read nor changed.
trixie_apt() {
  local a=$CACHE/trixie/apt
  "$1" -q -o Dir::Etc="$a/etc" -o Dir::State="$a/state" -o Dir::State::status="$a/status" \
    -o Dir::Cache="$a/cache" -o APT::Architecture=amd64 -o APT::Architectures=amd64 \
    -o Debug::NoLocking=1 -o APT::Sandbox::User=root "${@:2}"
}

fetch_trixie() {
  local t=$CACHE/trixie a=$CACHE/trixie/apt
  mkdir -p "$a/etc/sources.list.d" "$a/etc/preferences.d" "$a/state/lists/partial" "$a/cache/archives/partial" "$t/debs"
  touch "$a/status"
  local keys=/usr/share/keyrings/debian-archive-keyring.gpg
  [ -f "$keys" ] || die "release 13: $keys is missing (apt-get install debian-archive-keyring)"
  cat > "$a/etc/sources.list" <<EOF
deb [signed-by=$keys] http://deb.debian.org/debian trixie main
deb [signed-by=$keys] http://deb.debian.org/debian trixie-updates main
deb [signed-by=$keys] http://deb.debian.org/debian-security trixie-security main
EOF
  # Lists are refreshed once a day at most; when that fails, the lists already there do.
  if [ -z "$(find "$a/updated" -mtime -1 2>/dev/null)" ]; then
    if trixie_apt apt-get update >/dev/null; then touch "$a/updated"
    elif ! ls "$a/state/lists" | grep -q Packages; then die "release 13: apt-get update of the trixie lists failed"; fi
  fi
  local kernel=${LAB13_KERNEL:-$(trixie_apt apt-cache depends linux-image-amd64 | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | head -1)}
  [ -n "$kernel" ] || die "release 13: cannot tell which kernel linux-image-amd64 stands for"
  local want="$TRIXIE_PKGS $kernel" p missing=
  for p in $want; do ls "$t/debs/${p}_"*.deb >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    note "release 13: downloading$missing"
    # shellcheck disable=SC2086
    (cd "$t/debs" && trixie_apt apt-get download $missing >/dev/null) || die "release 13: apt-get download failed"
  fi
  # Unpack again only when the set of packages changed.
  local stamp; stamp=$(for p in $want; do ls "$t/debs/${p}_"*.deb | sort -V | tail -1; done)
  if [ ! -d "$t/root" ] || [ "$(cat "$t/root.stamp" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$t/root"; mkdir -p "$t/root"
    local f; for f in $stamp; do dpkg -x "$f" "$t/root"; done
    echo "$stamp" > "$t/root.stamp"
  fi
}

select_release() {
  case "$RELEASE" in 12) release_12 ;; 13) release_13 ;; *) die "LAB_RELEASE=$RELEASE: use 12 (Xen 4.17) or 13 (Xen 4.20)" ;; esac
}

# --- copying ELF files with their libraries ----------------------------------------------
# A path inside ROOT with its symlinks followed inside ROOT (absolute links stay in the tree).
in_root() { local root=${1%/} p=$2 n=0 t
  while [ -L "$root$p" ]; do
    t=$(readlink "$root$p"); case "$t" in /*) p=$t ;; *) p=$(dirname "$p")/$t ;; esac
    n=$((n + 1)); [ $n -lt 20 ] || die "symlink loop at $root$2"
  done
  # Merged /usr: a tree unpacked from packages may hold /lib/... only under /usr/lib/...
  if [ ! -e "$root$p" ] && [ -e "$root/usr$p" ]; then in_root "$root" "/usr$p"; return; fi
  echo "$root$p"
}
needed() { readelf -d "$1" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'; }
interp() { readelf -l "$1" 2>/dev/null | sed -n 's/.*Requesting program interpreter: \(.*\)\]/\1/p'; }
elf_type() { readelf -h "$1" 2>/dev/null | sed -n 's/^ *Type: *\([A-Z]*\).*/\1/p'; }

# The directories of FILE's RUNPATH or RPATH ($ORIGIN-relative ones are left out).
runpath() { readelf -d "$1" 2>/dev/null | sed -n 's/.*(R[UN]*PATH).*\[\(.*\)\]/\1/p' | tr ':' '\n' | grep '^/' || true; }
# Where ROOT keeps the library SONAME (searched like the loader's system path, after the
# directories given, a needing file's RUNPATH).
find_lib() { local root=$1 so=$2 d f; shift 2
  for d in "$@" /lib/$MULTIARCH /usr/lib/$MULTIARCH /lib /usr/lib /lib64 /usr/lib64; do
    f=$(in_root "$root" "$d/$so"); [ -e "$f" ] && { echo "$f"; return; }
  done
  return 1
}

# copy_libs ROOT DEST FILE...: every library FILE needs, recursively, from ROOT into DEST/
# (flat, by soname). Prints nothing; dies naming a library ROOT lacks.
copy_libs() { local root=$1 dest=$2; shift 2
  local queue=("$@") f so src
  mkdir -p "$dest"
  while [ ${#queue[@]} -gt 0 ]; do
    f=${queue[0]}; queue=("${queue[@]:1}")
    for so in $(needed "$f"); do
      [ -e "$dest/$so" ] && continue
      # shellcheck disable=SC2046
      src=$(find_lib "$root" "$so" $(runpath "$f")) || die "release $RELEASE: $so (needed by $(basename "$f")) is not in $root"
      cp -L "$src" "$dest/$so"; queue+=("$dest/$so")
    done
  done
}

# A program of the release at the same path in dom0, its libraries in dom0's /lib/<multiarch>.
ship_release() { local d=$1 p src; shift
  for p in "$@"; do
    src=$(in_root "$ROOT" "$p"); [ -e "$src" ] || die "release $RELEASE: $p is missing"
    mkdir -p "$d$(dirname "$p")"; cp -L "$src" "$d$p"
    copy_libs "$ROOT" "$d/lib/$MULTIARCH" "$src"
  done
}

# One FILE given to `build`, into dom0's /opt/xen-disk (see the header).
ship_ours() { local d=$1 f=$2 o=$1/opt/xen-disk name; name=$(basename "$f")
  mkdir -p "$o/bin" "$o/lib"
  case "$(elf_type "$f")" in
    EXEC|DYN)
      copy_libs / "$o/lib" "$f"
      if [ -n "$(interp "$f")" ]; then
        [ -e "$o/ld-linux-x86-64.so.2" ] || cp -L "$(interp "$f")" "$o/ld-linux-x86-64.so.2"
        cp -L "$f" "$o/bin/$name"
        cat > "$o/$name" <<EOF
#!/bin/sh
# $name, built on the lab's host: runs on the host's libraries in /opt/xen-disk/lib.
exec /opt/xen-disk/ld-linux-x86-64.so.2 --library-path /opt/xen-disk/lib --argv0 "\$0" /opt/xen-disk/bin/$name "\$@"
EOF
        chmod +x "$o/$name"
      else
        cp -L "$f" "$o/$name"
      fi ;;
    *) cp -L "$f" "$o/$name" ;;
  esac
}

# A package of ours (deb:FILE), into dom0's root (see the header).
ship_deb() { local d=$1 deb=$2 f
  dpkg-deb -x "$deb" "$d" || die "build: dpkg-deb -x $deb failed"
  for f in $(dpkg-deb -c "$deb" | awk '{ print $6 }' | sed 's|^\./|/|'); do
    [ -f "$d$f" ] && [ ! -L "$d$f" ] || continue
    case "$(elf_type "$d$f")" in EXEC|DYN) copy_missing_libs "$d" "$d$f" ;; esac
  done
}
# copy_missing_libs DOM0 FILE: the libraries FILE needs (recursively) that dom0 lacks, from
# this machine into DOM0/lib/<multiarch>.
copy_missing_libs() { local d=$1 queue=("$2") f so src
  while [ ${#queue[@]} -gt 0 ]; do
    f=${queue[0]}; queue=("${queue[@]:1}")
    for so in $(needed "$f"); do
      find_lib "$d" "$so" >/dev/null && continue
      src=$(find_lib / "$so") || die "build: $so (needed by $(basename "$f")) is not on this machine"
      cp -L "$src" "$d/lib/$MULTIARCH/$so"; queue+=("$d/lib/$MULTIARCH/$so")
    done
  done
}

# Kernel modules: NAME... and the modules they depend on (the `depends=` of their .modinfo,
# since a tree unpacked from a package has no modules.dep), dependencies first. Built-in ones
# are skipped. Prints paths relative to KDIR. Names compare with - and _ alike.
module_order() { local seen=" " m
  local files; files=$(cd "$KDIR" && find kernel -name '*.ko*')
  visit() { local name=${1//_/-} rel dep
    rel=$(echo "$files" | awk -v n="$name" '{ b = $0; sub(/.*\//, "", b); sub(/\.ko.*/, "", b); gsub(/_/, "-", b) } b == n { print; exit }')
    if [ -z "$rel" ]; then
      sed 's|.*/||; s|\.ko$||; s|_|-|g' "$KDIR/modules.builtin" 2>/dev/null | grep -qx -- "$name" && return 0
      die "release $RELEASE: kernel $KVER has no module $name"
    fi
    case "$seen" in *" $rel "*) return 0 ;; esac
    for dep in $(unpacked_module "$KDIR/$rel" | tr '\0' '\n' | sed -n 's/^depends=//p' | tr ',' ' '); do visit "$dep"; done
    seen="$seen$rel "; echo "$rel"
  }
  for m in "$@"; do visit "$m"; done
}
# A module's bytes, uncompressed (busybox insmod takes plain .ko files).
unpacked_module() {
  case "$1" in
    *.ko.xz) xz -dc "$1" ;; *.ko.zst) zstd -qdc "$1" ;; *.ko.gz) gzip -dc "$1" ;; *) cat "$1" ;;
  esac
}
put_module() { unpacked_module "$KDIR/$1" > "$2"; }

skeleton() { local r=$1 a
  rm -rf "$r"; mkdir -p "$r"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,etc,mnt,run,var/lib,var/log,lib/$MULTIARCH,lib64}
  ln -s ../run "$r/var/run"
  cp /bin/busybox "$r/bin/busybox"
  for a in $(/bin/busybox --list); do [ -e "$r/bin/$a" ] || ln -s busybox "$r/bin/$a"; done
}

# --- build -------------------------------------------------------------------------------
build() {
  select_release
  [ -x /bin/busybox ] && /bin/busybox --list >/dev/null || die "/bin/busybox (busybox-static) is missing; run: xen-lab.sh install"
  [ -f "$HYPERVISOR" ] || die "release $RELEASE: $HYPERVISOR is missing; run: xen-lab.sh install"
  mkdir -p "$OUT"
  zcat "$HYPERVISOR" > "$OUT/xen"
  cp "$VMLINUZ" "$OUT/vmlinuz"
  echo "$RELEASE $XENV $KVER" > "$OUT/release"

  # The guest: busybox, blkfront, and /init running /guest.sh when the test gives one.
  local g=$OUT/domU; skeleton "$g"
  # blkfront is loaded by the line `insmod /xen-blkfront.ko` (tests edit that line); modules
  # it depends on, if any, first.
  local mods m; mods=$(module_order xen-blkfront)
  : > "$g/deps"
  for m in $mods; do
    put_module "$m" "$g/$(basename "${m%%.ko*}").ko"
    case "$m" in */xen-blkfront.ko*) ;; *) basename "${m%%.ko*}" >> "$g/deps" ;; esac
  done
  cat > "$g/init" <<'EOF'
#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /deps); do insmod /$m.ko; done
insmod /xen-blkfront.ko
echo "GUEST: up"
if [ -x /guest.sh ]; then /guest.sh; else sleep 100000; fi
echo "GUEST: done"
poweroff -f
EOF
  chmod +x "$g/init"

  # dom0: busybox, the release's Xen daemons and tools, the event-channel/grant/privcmd
  # modules, the guest's kernel, and the test's files.
  local d=$OUT/dom0 x=/usr/lib/xen-$XENV/bin; skeleton "$d"
  ship_release "$d" $x/xenstored $x/xenconsoled $x/xen-init-dom0 $x/xl $x/libxl-save-helper /usr/bin/xenstore
  copy_libs "$ROOT" "$d/lib/$MULTIARCH" "$(in_root "$ROOT" "$x/xl")"
  cp -L "$(find_lib "$ROOT" libgcc_s.so.1)" "$d/lib/$MULTIARCH/"   # glibc dlopens it
  cp -L "$(in_root "$ROOT" "$LOADER")" "$d$LOADER"
  ln -s "$x/xl" "$d/usr/sbin/xl"
  local t; for t in read write ls list rm watch exists chmod; do ln -s xenstore "$d/usr/bin/xenstore-$t"; done
  mkdir -p "$d/etc/xen" "$d/var/lib/xen" "$d/var/lib/xenstored" "$d/run/xen" "$d/run/xenstored" "$d/var/log/xen/console" "$d/guest" "$d/mods" "$d/opt/xen-disk"
  # xl.conf belongs to xen-utils-common, which release 13 does not fetch: the defaults do.
  local conf; conf=$(in_root "$ROOT" /etc/xen/xl.conf)
  if [ -f "$conf" ]; then cp "$conf" "$d/etc/xen/"; else echo "# xl's defaults" > "$d/etc/xen/xl.conf"; fi
  : > "$d/mods/order"
  mods=$(module_order xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xenfs)
  for m in $mods; do
    put_module "$m" "$d/mods/$(basename "${m%%.ko*}").ko"; basename "${m%%.ko*}" >> "$d/mods/order"
  done
  cp "$OUT/vmlinuz" "$d/guest/vmlinuz"
  local f; for f in "$@"; do
    case "$f" in
      module:*) mods=$(module_order "${f#module:}"); for m in $mods; do put_module "$m" "$d/opt/xen-disk/$(basename "${m%%.ko*}").ko"; done ;;
      guest-module:*) mods=$(module_order "${f#guest-module:}"); for m in $mods; do put_module "$m" "$g/$(basename "${m%%.ko*}").ko"; done ;;
      guest:*) [ -e "${f#guest:}" ] || die "build: ${f#guest:} does not exist"; ship_ours "$g" "${f#guest:}" ;;
      deb:*) [ -f "${f#deb:}" ] || die "build: ${f#deb:} does not exist"; ship_deb "$d" "${f#deb:}" ;;
      *) [ -e "$f" ] || die "build: $f does not exist"; ship_ours "$d" "$f" ;;
    esac
  done
  cat > "$d/init" <<EOF
#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev; mount -t tmpfs tmp /tmp
mkdir -p /dev/pts; mount -t devpts devpts /dev/pts
for m in \$(cat /mods/order); do insmod /mods/\$m.ko; done
mkdir -p /proc/xen; mount -t xenfs xenfs /proc/xen
$x/xenstored --pid-file /run/xenstored.pid
$x/xen-init-dom0
$x/xenconsoled --pid-file /run/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console
echo "DOM0: ready"
[ -x /lab.sh ] && /lab.sh
echo "DOM0: done"
poweroff -f
EOF
  chmod +x "$d/init"
}

# --- run ---------------------------------------------------------------------------------
cpio_gz() { (cd "$1" && find . | cpio -o -H newc 2>/dev/null | gzip -1) > "$2"; }

run() {
  local script=${1:-} guest=${2:-} limit=${LAB_TIMEOUT:-600}
  [ -f "$script" ] || die "run: dom0 script '$script' not found"
  [ -d "$OUT/dom0" ] && [ -f "$OUT/release" ] || die "run: nothing built in $OUT (xen-lab.sh build first)"
  local built; built=$(cut -d' ' -f1 "$OUT/release")
  [ "$built" = "$RELEASE" ] || die "run: $OUT holds release $built, LAB_RELEASE is $RELEASE (build again)"
  cp "$script" "$OUT/dom0/lab.sh"; chmod +x "$OUT/dom0/lab.sh"
  rm -f "$OUT/domU/guest.sh"
  if [ -n "$guest" ]; then cp "$guest" "$OUT/domU/guest.sh"; chmod +x "$OUT/domU/guest.sh"; fi
  cpio_gz "$OUT/domU" "$OUT/dom0/guest/initrd.gz"
  cpio_gz "$OUT/dom0" "$OUT/dom0.gz"

  local log=$OUT/serial.log start ready= pid attempt=1 crashed
  start=$(date +%s)
  while :; do
    qemu-system-x86_64 -accel tcg -cpu qemu64 -m 3072 -smp 2 -nographic -no-reboot -nic none \
      -kernel "$OUT/xen" -append "console=com1 com1=115200 dom0_mem=1536M dom0_max_vcpus=2 noreboot" \
      -initrd "$OUT/vmlinuz console=hvc0 earlyprintk=xen panic=-1,$OUT/dom0.gz" </dev/null > "$log" 2>&1 &
    pid=$!
    # Xen may halt rather than power the machine off when dom0 does: once dom0 says it is done,
    # give QEMU a few seconds to exit on its own, then stop it. A dom0 that crashes (Xen says
    # so and halts) is stopped at once rather than waited for until the time limit.
    local now done_at= crashed=
    while kill -0 "$pid" 2>/dev/null; do
      sleep 1; now=$(date +%s)
      [ -n "$ready" ] || ! grep -aq 'DOM0: ready' "$log" || ready=$((now - start))
      [ -n "$done_at" ] || ! grep -aq 'DOM0: done' "$log" || done_at=$now
      if [ -z "$done_at" ] && grep -aq 'Hardware Dom0 crashed' "$log"; then
        crashed=yes; kill "$pid" 2>/dev/null || true; break
      fi
      if { [ -n "$done_at" ] && [ $((now - done_at)) -ge 15 ]; } || [ $((now - start)) -ge "$limit" ]; then
        [ -n "$done_at" ] || note "release $RELEASE: stopped after ${limit}s (LAB_TIMEOUT)"
        kill "$pid" 2>/dev/null || true; break
      fi
    done
    wait "$pid" 2>/dev/null || true
    [ -n "$crashed" ] || break
    # Under TCG, dom0's kernel now and then dies while it boots (an oops in its own early
    # code). Nothing of the lab has run then, so booting again measures and checks the same
    # thing; a crash after dom0 was ready is the lab's result and is not retried.
    if [ -n "$ready" ] || [ "$attempt" -ge 2 ]; then
      note "release $RELEASE: dom0 crashed ($(grep -a -m1 -E 'Kernel panic|BUG:|Oops|RIP:' "$log" | tr -d '\r' | cut -c1-120))"
      break
    fi
    note "release $RELEASE: dom0 crashed while booting, before the lab ran ($(grep -a -m1 -E 'Kernel panic|BUG:|Oops|RIP:' "$log" | tr -d '\r' | cut -c1-120)); booting again"
    cp "$log" "$OUT/serial-crashed-boot.log"
    attempt=$((attempt + 1))
  done
  note "release $RELEASE (Xen $XENV_BUILT, Linux $KVER_BUILT): dom0 ready after ${ready:-?}s, whole run $(( $(date +%s) - start ))s"
  grep -a -E 'DOM0:|GUEST:|LAB:' "$log" || true
}

install() {
  [ "$(id -u)" = 0 ] || die "install: run as root"
  export DEBIAN_FRONTEND=noninteractive
  local want="qemu-system-x86 busybox-static cpio xz-utils zstd binutils debian-archive-keyring" p missing=
  [ "$RELEASE" = 12 ] && want="$want xen-hypervisor-4.17-amd64 xen-utils-4.17 xenstore-utils linux-image-amd64"
  for p in $want; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    apt-get update -qq
    # Debian 12's qemu-system-x86 wants the qemu-utils of its own version.
    case "$missing " in *" qemu-system-x86 "*)
      missing="$missing qemu-utils=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}') qemu-block-extra-" ;;
    esac
    # shellcheck disable=SC2086
    apt-get install -y -qq --allow-downgrades $missing >/dev/null
  fi
  [ "$RELEASE" = 13 ] && fetch_trixie
  return 0
}

cmd=${1:-}; shift || true
case "$cmd" in
  install) install ;;
  build) build "$@" ;;
  run) XENV_BUILT=? KVER_BUILT=?; read -r _ XENV_BUILT KVER_BUILT < "$OUT/release" 2>/dev/null || true; run "$@" ;;
  *) echo "usage: LAB_RELEASE=12|13 $0 install | build [FILE...] | run DOM0_SCRIPT [GUEST_SCRIPT]" >&2; exit 2 ;;
esac
