//! Helpers shared by the VHD integration tests: open through the FFI boundary, read/write,
//! run qemu tools (a missing tool fails the test).

#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use vhd::VhdPlugin;
use xen_disk_plugin_api::{with_read_bufs, with_write_bufs, Config, Disk, ForeignDisk, Result};

pub fn open(pairs: &[String]) -> Result<ForeignDisk> {
    let config = Config::from_pairs(pairs).expect("config pairs");
    ForeignDisk::open(xen_disk_plugin_api::__root_module::<VhdPlugin>(), &config)
}

pub fn open_path(p: &Path) -> Result<ForeignDisk> {
    open(&[format!("path={}", p.display())])
}

pub fn read(d: &ForeignDisk, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    // Two buffers so requests cross a buffer edge.
    let (a, b) = buf.split_at_mut(len / 2);
    with_read_bufs(&mut [a, b], |bufs| d.read(off, bufs)).expect("read");
    buf
}

pub fn write(d: &ForeignDisk, off: u64, data: &[u8]) {
    with_write_bufs(&[data], |bufs| d.write(off, bufs)).expect("write");
}

pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} must be installed: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
