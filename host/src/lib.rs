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
//! - [`plugin`]: find, load and check plugin `.so` files.
//! - [`blkif`]: the Xen block protocol's byte-exact structures and the shared ring.
//! - [`frontend`]: a blkfront in Rust for simulated guests (`check`, `bench`, tests).
//! - [`backend`]: one virtual disk's pieces: features, frontend keys, I/O workers.
//! - [`control`]: the control socket (`ctl`): list, statistics, plugin swap, detach.
//! - [`xen`]: the platform (xenstore, grants, event channels), real (`linux`) or simulated
//!   (`sim`), behind traits the rest cannot tell apart.

pub mod backend;
pub mod bench;
pub mod blkif;
pub mod check;
pub mod cli;
pub mod control;
pub mod frontend;
pub mod histogram;
pub mod plugin;
pub mod simulation;
pub mod xen;
