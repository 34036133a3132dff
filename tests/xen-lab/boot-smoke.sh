#!/bin/sh
# dom0 script for a quick look at a lab release: the toolstack answers, a PV guest boots to its
# init, and what `build` was given runs. No disk is served.
#   LAB_RELEASE=13 xen-lab.sh build target/release/xen-disk-host /usr/bin/qemu-img
#   LAB_RELEASE=13 xen-lab.sh run tests/xen-lab/boot-smoke.sh
xl info | grep -E '^(xen_version|xen_caps|total_memory|nr_cpus)' | sed 's/^/LAB: info /'
echo "LAB: dom0 kernel $(uname -r)"
xl list | sed 's/^/LAB: list /'
for f in /opt/xen-disk/*; do
  case "$f" in *.so*|*.ko) continue ;; esac
  [ -f "$f" ] && [ -x "$f" ] || continue
  echo "LAB: runs $(basename "$f"): $("$f" --version 2>&1 | head -1)"
done
cat > /tmp/smoke.cfg <<CFG
name = "smoke"
type = "pv"
kernel = "/guest/vmlinuz"
ramdisk = "/guest/initrd.gz"
extra = "console=hvc0"
memory = 256
vcpus = 1
on_poweroff = "destroy"
CFG
t0=$(date +%s)
xl create /tmp/smoke.cfg 2>&1 | sed 's/^/LAB: create /'
L=/var/log/xen/console/guest-smoke.log
i=0; while [ $i -lt 120 ] && ! grep -q 'GUEST: up' $L 2>/dev/null; do sleep 1; i=$((i + 1)); done
echo "LAB: guest up after $(( $(date +%s) - t0 ))s"
xl list | sed 's/^/LAB: list /'
grep 'GUEST:' $L | sed 's/^/LAB: console /'
xl destroy smoke
