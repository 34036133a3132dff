//! Fuzz target: arbitrary bytes as a VHD file, opened writable; writes (allocating and in
//! place), zeroes, a discard and a flush, then a reopen and reads. Any error is fine; a panic,
//! hang or out-of-bounds access is a bug.

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use vhd::image::{Image, Src};

fuzz_target!(|data: &[u8]| {
    let path: PathBuf = PathBuf::from(format!("/dev/shm/vhd-fuzz-w-{}.vhd", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(mut img) = Image::open(&path, true) {
        let size = img.size();
        let chunk = vec![0x5au8; 12288];
        for (i, off) in [0, size / 3, size.saturating_sub(4096), size / 2 + 512]
            .into_iter()
            .enumerate()
        {
            let off = off / 512 * 512;
            let n = (size.saturating_sub(off)).min(chunk.len() as u64) / 512 * 512;
            if n == 0 {
                continue;
            }
            let _ = match i {
                2 => img.store(off, n, Src::Zeroes),
                3 => img.discard(off, n),
                _ => img.write(off, &chunk[..n as usize]),
            };
        }
        let _ = img.flush();
        drop(img);
        if let Ok(img) = Image::open(&path, false) {
            let mut buf = vec![0u8; 8192];
            let size = img.size();
            for off in [0, size / 3] {
                let n = (size.saturating_sub(off)).min(buf.len() as u64) as usize / 512 * 512;
                let _ = img.read(off, &mut buf[..n]);
            }
        }
    }
    let _ = std::fs::remove_file(&path);
});
