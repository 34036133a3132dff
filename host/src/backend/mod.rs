//! One virtual disk served to one guest: the xenbus handshake, the rings, the workers.
//!
//! The pure decision parts live here first, each testable alone: [`state`] (what to do on a
//! watch event), [`features`] (what to publish), [`frontend_keys`] (what the guest
//! published, hostile), [`params`] (the toolstack's `params`), [`vbd`] (device numbers).

pub mod attach;
pub mod device;
pub mod disks_config;
pub mod domains;
pub mod features;
pub mod frontend_keys;
pub mod inflight;
pub mod io;
pub mod params;
pub mod queue;
pub mod registry;
pub mod reload;
pub mod server;
pub mod state;
pub mod stats;
pub mod vbd;
pub mod wake;
pub mod workers;
