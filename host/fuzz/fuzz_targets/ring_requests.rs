//! Fuzzes what a hostile frontend controls: the whole shared ring (indices and entries) and
//! the indirect segment pages, through attach, consumption, decoding, validation and
//! responses, with device limits taken from the input too. Nothing may panic, hang or touch
//! memory outside the ring.
//!
//! Run (stable toolchain, from `host/`):
//!   RUSTC_BOOTSTRAP=1 cargo fuzz run ring_requests -- -max_total_time=600
//!
//! Input: byte 0 = ring order (mod 5) and protocol (bit 3), byte 1 = device flags,
//! bytes 2..4 = max indirect segments, then the ring memory, then the indirect pages.

#![no_main]

use libfuzzer_sys::fuzz_target;
use xen_disk_host::blkif::abi::*;
use xen_disk_host::blkif::request::{validate, validate_indirect_segments, Limits, Valid};
use xen_disk_host::blkif::ring::{BackRing, Response};

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let order = u32::from(data[0] % 5);
    let protocol = if data[0] & 8 != 0 { Protocol::X86_32 } else { Protocol::X86_64 };
    let flags = data[1];
    let limits = Limits {
        sectors: 1 << (8 + (flags & 15)),
        logical_sector_size: if flags & 16 != 0 { 4096 } else { 512 },
        read_only: flags & 32 != 0,
        flush: flags & 64 != 0,
        discard: flags & 128 != 0,
        discard_secure: flags & 1 != 0,
        max_indirect_segments: u16::from_le_bytes([data[2], data[3]]),
    };
    let len = XEN_PAGE_SIZE << order;
    let mut ring = vec![0u64; len / 8];
    // SAFETY: viewing our own u64 buffer as bytes.
    let bytes = unsafe { std::slice::from_raw_parts_mut(ring.as_mut_ptr().cast::<u8>(), len) };
    let body = &data[4..];
    let n = body.len().min(len);
    bytes[..n].copy_from_slice(&body[..n]);
    let indirect_pages = &body[n..];

    // SAFETY: the buffer outlives the ring view.
    let Ok(mut back) = (unsafe { BackRing::attach(ring.as_mut_ptr().cast(), len, protocol) }) else { return };
    let mut entry = [0u8; MAX_ENTRY_SIZE];
    let mut segments = Vec::new();
    for _round in 0..4 {
        if back.poll().is_err() {
            return;
        }
        while let Some(req) = back.take(&mut entry) {
            let status = match validate(&req, &limits) {
                Ok(Valid::Indirect { nr_segments, sector_number, pages, .. }) => {
                    let have = indirect_pages.len().min(pages * XEN_PAGE_SIZE);
                    match validate_indirect_segments(&indirect_pages[..have], nr_segments, sector_number, &limits, &mut segments) {
                        Ok(len) => {
                            assert!(len > 0 && len % u64::from(limits.logical_sector_size) == 0);
                            assert!((sector_number * 512).checked_add(len).unwrap() <= limits.sectors * 512);
                            BLKIF_RSP_OKAY
                        }
                        Err(r) => r.status.code(),
                    }
                }
                Ok(Valid::Data { offset, len, .. }) => {
                    assert!(offset.checked_add(len).unwrap() <= limits.sectors * 512);
                    BLKIF_RSP_OKAY
                }
                Ok(_) => BLKIF_RSP_OKAY,
                Err(r) => r.status.code(),
            };
            assert!(back.put_response(&Response { id: req.id(), operation: req.echo_op(), status }));
        }
        back.push_responses();
        if !matches!(back.final_check(), Ok(true)) {
            break;
        }
    }
});
