//! /dev/xen/evtchn.
