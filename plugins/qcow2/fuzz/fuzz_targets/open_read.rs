//! Fuzz target: arbitrary bytes as a qcow2 file, opened read-only and read at a few offsets.
//! Any error is fine; a panic, abort or out-of-bounds access is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;

fuzz_target!(|data: &[u8]| {
    let path = PathBuf::from(format!("/dev/shm/qcow2-fuzz-{}.img", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(img) = qcow2::image::Image::open(&path, true, &[]) {
        let size = img.size();
        let mut buf = vec![0u8; 8192];
        for off in [0, size / 3, size.saturating_sub(8192), size / 2 + 511] {
            let n = (size.saturating_sub(off)).min(buf.len() as u64) as usize;
            let _ = img.read_at(off, &mut buf[..n]);
        }
    }
});
