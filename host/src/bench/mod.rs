//! Benchmarks: measured figures with a same-run reference beside them.
//!
//! - [`direct`]: a plugin's disk driven straight through the loaded `.so` boundary (no
//!   ring), with a `memcpy` reference of the same block size measured in the same run.
//! - [`ring`]: the full ring path through the simulator, a Rust frontend driving a device queue.
//! - [`nbdkit`]: the same pattern through nbdkit's null plugin and fio's nbd engine.
//! - [`qemu_img`]: `qemu-img bench` on the same image file, for the image-format plugins.
//! - [`fio_nbd`]: fio's nbd engine against any NBD server, the reference for NBD clients.
//! - [`rbd`]: `rbd bench` on the same Ceph image, for the `ceph-rbd` plugin.
//! - [`fair`], [`rbd_fair`], [`nbd_fair`]: the fair references, small librbd and libnbd
//!   clients that write fresh data on every request at the plugin's depth and block size.
//! - [`cpu`]: `--client-cpu`, the client side of the plugin's run and of the fair
//!   references on one CPU.
//! - [`submit`]: `--submit`, an asynchronous plugin driven as the fair references drive
//!   their libraries (one thread, its submissions, no ring).
//! - [`usage`]: CPU time per request, the process's and its client side's, and the
//!   machine's load, for a ring run and a fair reference alike.

pub mod cpu;
pub mod direct;
pub mod fair;
pub mod fio_nbd;
pub mod nbd_fair;
pub mod nbdkit;
pub mod qemu_img;
pub mod rbd;
pub mod rbd_fair;
pub mod ring;
pub mod submit;
pub mod usage;
