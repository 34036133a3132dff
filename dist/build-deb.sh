#!/usr/bin/env bash
# Builds the Debian packages of xen-disk from this workspace with dpkg-deb (nothing from
# crates.io beyond what `cargo build` already has):
#
#   xen-disk                     /usr/bin/xen-disk-host; the plugins that need nothing but libc
#                                (cow delay discard error file mmap qcow2 vhd) in
#                                /usr/lib/xen-disk/plugins; the xen-disk service; the hotplug
#                                script /etc/xen/scripts/block-xen-disk; the example
#                                /etc/xen-disk/disks.toml (a conffile); the man page
#                                xen-disk-host(8), written by the binary from its own command
#                                line
#   xen-disk-plugin-nbd-client   libnbd_client.so (needs libnbd, which brings GnuTLS, libxml2)
#   xen-disk-plugin-ceph-rbd     libceph_rbd.so (needs librbd and librados: over 20 MB with
#                                their Boost libraries, which a dom0 without Ceph should not
#                                have to install)
#
# Each package's Depends come from dpkg-shlibdeps over its ELF files; xen-disk Suggests the
# two plugin packages, which depend on xen-disk of the same version.
#
# Usage: dist/build-deb.sh [--profile release|debug|NAME] [--out DIR] [--no-build]
#   --profile   the cargo profile whose files are packaged (default release)
#   --out       where the .deb files go (default target/debian); their paths are printed,
#               one a line
#   --no-build  package what target/<profile> holds (the tests build it themselves)
# DEB_COMPRESS=xz|gzip|zstd|none picks dpkg-deb's compression (default xz).
# HOTPLUG=FILE packages another hotplug script than dist/hotplug/block-xen-disk (tests).
# Needs: cargo (unless --no-build), dpkg-deb, dpkg-shlibdeps (dpkg-dev), strip (binutils),
# gzip. Files are stripped of debug information only: symbol names stay, for backtraces.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
profile=release out=$root/target/debian build=1
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile=${2:?--profile needs a name}; shift 2 ;;
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    --no-build) build=; shift ;;
    *) echo "build-deb: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
die() { echo "build-deb: $*" >&2; exit 1; }

# The hotplug script that xl's `script=` names: without it a tap disk never connects, so a
# package without it is no package.
hotplug=${HOTPLUG:-$root/dist/hotplug/block-xen-disk}

for t in dpkg-deb dpkg-shlibdeps strip gzip; do
  command -v "$t" >/dev/null || die "$t is missing (apt-get install dpkg-dev binutils gzip)"
done
[ -f "$hotplug" ] || die "$hotplug is missing: the package must ship the hotplug script"

# The plugins are the crates under plugins/; their [lib] name is the file's.
lib_of() { sed -n '/^\[lib\]/,/^\[/ s/^name *= *"\([^"]*\)".*/\1/p' "$1/Cargo.toml" | head -1; }
pkg_of() { sed -n '/^\[package\]/,/^\[/ s/^name *= *"\([^"]*\)".*/\1/p' "$1/Cargo.toml" | head -1; }
# Plugins with a package of their own (they link libraries a dom0 may not want).
own_package() { case "$1" in nbd_client | ceph_rbd) return 0 ;; *) return 1 ;; esac; }

crates=(-p xen-disk-host) plugin_libs=()
for dir in "$root"/plugins/*/; do
  lib=$(lib_of "$dir"); [ -n "$lib" ] || die "$dir/Cargo.toml has no [lib] name"
  crates+=(-p "$(pkg_of "$dir")"); plugin_libs+=("$lib")
done

# cargo's profile `dev` builds into target/debug.
case "$profile" in dev | debug) profile=dev dir=debug ;; *) dir=$profile ;; esac
if [ -n "$build" ]; then
  (cd "$root" && cargo build --profile "$profile" "${crates[@]}") || die "cargo build failed"
fi
bin_dir=$root/target/$dir
[ -x "$bin_dir/xen-disk-host" ] || die "$bin_dir/xen-disk-host is missing (build it, or leave out --no-build)"
for lib in "${plugin_libs[@]}"; do
  [ -f "$bin_dir/lib$lib.so" ] || die "$bin_dir/lib$lib.so is missing (build it, or leave out --no-build)"
done

version=$("$bin_dir/xen-disk-host" --version | awk '{print $2}')
[ -n "$version" ] || die "xen-disk-host --version printed no version"
arch=$(dpkg --print-architecture)
mkdir -p "$out"
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT

put() { # put MODE SRC DEST: DEST inside the staged tree
  install -D -m "$1" "$2" "$3"
}
put_elf() { put "$1" "$2" "$3"; strip --strip-debug "$3"; }
copyright() { # the package's copyright file, as Debian policy asks for
  mkdir -p "$1/usr/share/doc/$2"
  cat > "$1/usr/share/doc/$2/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: xen-disk
License: MIT OR Apache-2.0

Files: *
License: MIT OR Apache-2.0
EOF
}
# The Depends of the ELF files given, from dpkg-shlibdeps (which wants a debian/control).
shlib_depends() {
  mkdir -p "$work/src/debian"
  printf 'Source: xen-disk\n\nPackage: xen-disk\nArchitecture: any\n' > "$work/src/debian/control"
  (cd "$work/src" && dpkg-shlibdeps -O "$@" 2>"$work/shlibdeps.err") | sed -n 's/^shlibs:Depends=//p' \
    || { cat "$work/shlibdeps.err" >&2; die "dpkg-shlibdeps failed"; }
}
# build_deb NAME STAGE SUMMARY DEPENDS-FIRST EXTRA-LINE: writes DEBIAN/control (the long
# description from DEBIAN/description) and builds; prints the .deb's path.
build_deb() {
  local name=$1 stage=$2 summary=$3 first=$4 extra=$5 elfs depends size
  mapfile -t elfs < <(find "$stage" -type f \( -name '*.so' -o -path '*/usr/bin/*' \))
  depends=$(shlib_depends "${elfs[@]}")
  [ -n "$depends" ] || die "$name: dpkg-shlibdeps found no dependencies"
  size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
  mkdir -p "$stage/DEBIAN"
  {
    echo "Package: $name"
    echo "Version: $version"
    echo "Architecture: $arch"
    echo "Maintainer: xen-disk developers <xen-disk@localhost>"
    echo "Installed-Size: $size"
    echo "Section: admin"
    echo "Priority: optional"
    echo "Depends: ${first:+$first, }$depends"
    [ -z "$extra" ] || echo "$extra"
    echo "Description: $summary"
    sed 's/^/ /' "$stage/DEBIAN/description"
  } > "$stage/DEBIAN/control.new"
  rm "$stage/DEBIAN/description"; mv "$stage/DEBIAN/control.new" "$stage/DEBIAN/control"
  local deb=$out/${name}_${version}_${arch}.deb
  dpkg-deb --root-owner-group -Z"${DEB_COMPRESS:-xz}" --build "$stage" "$deb" >/dev/null || die "$name: dpkg-deb --build failed"
  echo "$deb"
}

# --- xen-disk --------------------------------------------------------------------------
s=$work/xen-disk
put_elf 0755 "$bin_dir/xen-disk-host" "$s/usr/bin/xen-disk-host"
for lib in "${plugin_libs[@]}"; do
  own_package "$lib" || put_elf 0644 "$bin_dir/lib$lib.so" "$s/usr/lib/xen-disk/plugins/lib$lib.so"
done
put 0644 "$root/dist/xen-disk.service" "$s/usr/lib/systemd/system/xen-disk.service"
put 0644 "$root/dist/disks.toml" "$s/etc/xen-disk/disks.toml"
echo /etc/xen-disk/disks.toml > "$work/conffiles"
put 0755 "$hotplug" "$s/etc/xen/scripts/block-xen-disk"
echo /etc/xen/scripts/block-xen-disk >> "$work/conffiles"
mkdir -p "$s/usr/share/man/man8"
"$s/usr/bin/xen-disk-host" manpage > "$work/xen-disk-host.8" || die "xen-disk-host manpage failed"
grep -q '^\.TH ' "$work/xen-disk-host.8" || die "xen-disk-host manpage printed no man page"
gzip -9n < "$work/xen-disk-host.8" > "$s/usr/share/man/man8/xen-disk-host.8.gz"
copyright "$s" xen-disk
mkdir -p "$s/DEBIAN"
mv "$work/conffiles" "$s/DEBIAN/conffiles"
# Installing or removing never restarts the service: a restart detaches every guest's disk.
# Removal stops it (its binary is going); an upgrade leaves the running one until the
# administrator restarts it.
cat > "$s/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = configure ] && [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
exit 0
EOF
cat > "$s/DEBIAN/prerm" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then systemctl stop xen-disk.service || true; fi
exit 0
EOF
cat > "$s/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = remove ] || [ "$1" = purge ]; then
  if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
fi
exit 0
EOF
chmod 0755 "$s/DEBIAN/postinst" "$s/DEBIAN/prerm" "$s/DEBIAN/postrm"
cat > "$s/DEBIAN/description" <<'EOF'
xen-disk-host serves virtual disks to Xen guests' blkfront drivers from dom0 or a driver
domain, each disk a plugin: raw files and block devices, memory-mapped images, qcow2, VHD,
copy-on-write over a gold image. The xen-disk service serves the disks listed in
/etc/xen-disk/disks.toml and those xl creates with backendtype=tap.
EOF
build_deb xen-disk "$s" "userspace Xen block backend with plugin disks" "" \
  "Suggests: xen-disk-plugin-nbd-client, xen-disk-plugin-ceph-rbd"

# --- one package per plugin with libraries of its own -------------------------------------
for lib in "${plugin_libs[@]}"; do
  own_package "$lib" || continue
  name=xen-disk-plugin-${lib//_/-}
  s=$work/$name
  put_elf 0644 "$bin_dir/lib$lib.so" "$s/usr/lib/xen-disk/plugins/lib$lib.so"
  copyright "$s" "$name"
  mkdir -p "$s/DEBIAN"
  case "$lib" in
    nbd_client) what="an NBD server's export (qemu-nbd, nbdkit, nbd-server) through libnbd" ;;
    ceph_rbd) what="a Ceph RBD image through librbd" ;;
  esac
  echo "The ${lib//_/-} plugin of xen-disk: serves a Xen guest's disk from $what." | fold -s -w 79 | sed 's/ *$//' > "$s/DEBIAN/description"
  # xen-disk of this very version: the host checks the plugin ABI at load; the package
  # says so at install.
  build_deb "$name" "$s" "xen-disk plugin: ${lib//_/-}" "xen-disk (= $version)" ""
done
