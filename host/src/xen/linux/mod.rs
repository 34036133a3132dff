//! The real platform on a Linux dom0: /dev/xen/{gntdev,evtchn} and the xenstore transports.

pub mod evtchn;
pub mod gntdev;
