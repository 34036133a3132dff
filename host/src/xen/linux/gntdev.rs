//! /dev/xen/gntdev.
