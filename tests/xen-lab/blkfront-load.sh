#!/bin/sh
# Loads xen-blkfront with the xen_blkfront.* parameters of the kernel command line, as
# modprobe would (the lab's busybox init uses insmod, which passes none).
insmod /xen-blkfront.ko $(for a in $(cat /proc/cmdline); do case $a in xen_blkfront.*) echo "${a#xen_blkfront.}" ;; esac; done)
