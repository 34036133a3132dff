//! Benchmarks: measured figures with a same-run reference beside them.
//!
//! - [`direct`]: a plugin's disk driven straight through the loaded `.so` boundary (no
//!   ring), with a `memcpy` reference of the same block size measured in the same run.
//! - [`ring`]: the full ring path through the simulator, a Rust frontend driving a device queue.
//! - [`nbdkit`]: the same pattern through nbdkit's null plugin and fio's nbd engine.
//! - [`rbd`]: `rbd bench` on the same Ceph image, for the `ceph-rbd` plugin.
//! - [`histogram`]: latency percentiles in fixed memory.

pub mod direct;
pub mod histogram;
pub mod nbdkit;
pub mod rbd;
pub mod ring;
