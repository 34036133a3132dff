//! Fuzz target: arbitrary bytes as a VHD file; open it and read every sector. Any error is
//! fine; a panic, hang or out-of-bounds access is a bug.

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;

fuzz_target!(|data: &[u8]| {
    let path: PathBuf = std::env::temp_dir().join(format!("vhd-fuzz-{}.vhd", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(img) = vhd::image::Image::open(&path, false) {
        // Read at most 4 MiB, spread over the disk, so huge declared sizes stay fast.
        let size = img.size();
        let mut buf = vec![0u8; 64 * 1024];
        let step = (size / 64).max(65536) / 512 * 512;
        let mut off = 0;
        while off < size {
            let n = (size - off).min(buf.len() as u64) as usize;
            let _ = img.read(off, &mut buf[..n]);
            off += step;
        }
    }
});
