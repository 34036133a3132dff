//! xen-disk-host: a userspace Xen block backend whose disks are plugins.
//!
//! Data flows one way through the modules:
//!
//! ```text
//!  xen::xenstore handshake ─▶ xen::grant (ring pages mapped) ─▶ blkif::ring (request copied out)
//!    ─▶ blkif request validated ─▶ xen::grant (segments mapped) ─▶ plugin Disk read/write
//!    ─▶ blkif response on the ring ─▶ xen::evtchn kick
//! ```
//!
//! The modules, and which uses which (arrows point at what is used; there is no cycle, and
//! `cli` at the top uses any of them):
//!
//! ```text
//!  cli ─┬─▶ control ────▶ backend, nbd (live backup's export)
//!       ├─▶ nbd ────────▶ plugin
//!       ├─▶ metrics ────▶ backend (the registry's devices, read only)
//!       ├─▶ simulation ─▶ backend, frontend
//!       ├─▶ bench ──────▶ backend, frontend
//!       └─▶ check ──────▶ plugin
//!  backend ─▶ plugin, blkif, xen        frontend ─▶ blkif, xen
//!  plugin ──▶ the plugin-api crate      leaves: blkif, xen, histogram, rng
//! ```
//!
//! - [`plugin`]: find, load and check plugin `.so` files; the guard around an open disk.
//! - [`blkif`]: the Xen block protocol's byte-exact structures, typed values, the shared ring.
//! - [`xen`]: the platform (xenstore, xenbus states, grants, event channels), real
//!   (`linux`) or simulated (`sim`), behind traits the rest cannot tell apart.
//! - [`backend`]: one virtual disk's pieces (advertisement, frontend keys, the ring thread,
//!   I/O workers), the device, the `serve` daemon and its registry of devices.
//! - [`control`]: the control socket (`ctl`) over the registry: list, statistics, limits, swap,
//!   detach, live backup (snapshot, commit).
//! - [`nbd`]: an NBD server for any plugin stack (`xen-disk-host nbd`, live backup's export).
//! - [`metrics`]: the Prometheus endpoint over the same registry, and the process's figures.
//! - [`frontend`]: a blkfront in Rust for simulated guests (`check`, `bench`, tests).
//! - [`simulation`]: a whole disk end to end in one process (`sim read/write`, tests).
//! - [`check`]: the conformance suite for plugin authors; [`bench`](mod@bench): measured figures.
//! - [`histogram`], [`rng`]: latency percentiles and deterministic test data, used by several.

pub mod backend;
pub mod bench;
pub mod blkif;
pub mod check;
pub mod cli;
pub mod control;
pub mod frontend;
pub mod histogram;
pub mod metrics;
pub mod nbd;
pub mod plugin;
pub mod rng;
pub mod simulation;
#[cfg(test)]
mod test_disks;
pub mod xen;
