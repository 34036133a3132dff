//! One virtual disk served to one guest: the xenbus handshake, the rings, the workers.
//!
//! The pure decision parts live here first, each testable alone: [`state`] (what to do on a
//! watch event), [`features`] (the advertisement: what to publish and what the ring then
//! accepts), [`frontend_keys`] (what the guest published, hostile), [`params`] (the
//! toolstack's `params`), [`descriptor`] (the files an `xl` disk's target may name), [`vbd`]
//! (device numbers), [`reload`] (what a changed `disks.toml` means for the disks served).
//! Then the moving parts: [`queue`] (the ring thread), [`limits`] (per-disk I/O limits),
//! [`device`] (one disk), [`journal`] (what a ring leaves for the process that takes it
//! over after a crash), [`server`] (the `serve` daemon) and [`registry`] (the devices the
//! control socket sees).

pub mod attach;
pub mod descriptor;
pub mod device;
pub mod device_loop;
pub mod disks_config;
pub mod domains;
pub mod done;
pub mod features;
pub mod frontend_keys;
pub mod inflight;
pub mod io;
pub mod journal;
pub mod limits;
pub mod params;
pub mod queue;
pub mod registry;
pub mod reload;
pub mod server;
pub mod stack_record;
pub mod state;
pub mod stats;
pub mod vbd;
pub mod wake;
pub mod workers;
