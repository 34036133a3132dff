//! Fuzz target: arbitrary bytes as a qcow2 file, opened writable; writes (allocating and in
//! place), zeroes, discards and a flush, then a read-only reopen and reads. Any error is fine;
//! a panic, abort, hang or out-of-bounds access is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;

fuzz_target!(|data: &[u8]| {
    let path = PathBuf::from(format!("/dev/shm/qcow2-fuzz-w-{}.img", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(img) = qcow2::image::Image::open(&path, false, &[]) {
        let size = img.size();
        let chunk = vec![0x5au8; 12288];
        for (i, off) in [0, size / 3, size.saturating_sub(4096), size / 2 + 512]
            .into_iter()
            .enumerate()
        {
            let off = off / 512 * 512;
            let n = (size.saturating_sub(off)).min(chunk.len() as u64);
            if n == 0 {
                continue;
            }
            let _ = match i {
                2 => img.zero_range(off, n / 512 * 512, false),
                3 => img.zero_range(off, n / 512 * 512, true),
                _ => img.write_at(off, &chunk[..n as usize / 512 * 512]),
            };
        }
        let _ = img.flush();
        drop(img);
        if let Ok(img) = qcow2::image::Image::open(&path, true, &[]) {
            let mut buf = vec![0u8; 8192];
            let size = img.size();
            for off in [0, size / 3] {
                let n = (size.saturating_sub(off)).min(buf.len() as u64) as usize;
                let _ = img.read_at(off, &mut buf[..n]);
            }
        }
    }
    let _ = std::fs::remove_file(&path);
});
