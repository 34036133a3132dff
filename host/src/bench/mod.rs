//! Benchmarks: measured figures with a same-run reference beside them.
//!
//! - [`direct`]: a plugin's disk driven straight through the loaded `.so` boundary (no
//!   ring), with a `memcpy` reference of the same block size measured in the same run.
//! - [`histogram`]: latency percentiles in fixed memory.

pub mod direct;
pub mod histogram;
