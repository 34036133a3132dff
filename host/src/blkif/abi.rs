//! The blkif ABI: operation and status codes, the two wire layouts, ring geometry.
//!
//! Everything here is a fact of Xen's `io/blkif.h` and `io/ring.h` (checked against the real
//! headers by `host/tests/blkif_abi_vs_c.rs`). Structures are never transmuted from guest
//! memory: requests are decoded field by field from a private copy, at the offsets below.

/// Read from the disk.
pub const BLKIF_OP_READ: u8 = 0;
/// Write to the disk.
pub const BLKIF_OP_WRITE: u8 = 1;
/// Flush earlier writes, then write (all earlier requests complete first).
pub const BLKIF_OP_WRITE_BARRIER: u8 = 2;
/// Flush the disk cache, then write the segments if any.
pub const BLKIF_OP_FLUSH_DISKCACHE: u8 = 3;
/// Reserved (a SLES extension); answered EOPNOTSUPP.
pub const BLKIF_OP_RESERVED_1: u8 = 4;
/// Discard a range of sectors.
pub const BLKIF_OP_DISCARD: u8 = 5;
/// Read or write with segment lists in granted indirect pages.
pub const BLKIF_OP_INDIRECT: u8 = 6;

/// Response status: success.
pub const BLKIF_RSP_OKAY: i16 = 0;
/// Response status: failure.
pub const BLKIF_RSP_ERROR: i16 = -1;
/// Response status: operation not supported.
pub const BLKIF_RSP_EOPNOTSUPP: i16 = -2;

/// What a response says, typed: the backend decides in these terms and writes the number
/// only when it encodes the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// BLKIF_RSP_OKAY.
    Okay,
    /// BLKIF_RSP_ERROR: the request failed (an I/O error, or a request refused as invalid).
    Error,
    /// BLKIF_RSP_EOPNOTSUPP: the operation is not offered.
    NotSupported,
}

impl Status {
    /// The value on the ring.
    pub const fn code(self) -> i16 {
        match self {
            Status::Okay => BLKIF_RSP_OKAY,
            Status::Error => BLKIF_RSP_ERROR,
            Status::NotSupported => BLKIF_RSP_EOPNOTSUPP,
        }
    }

    /// A value read off the ring; `None` for one no backend should write.
    pub const fn from_code(code: i16) -> Option<Status> {
        match code {
            BLKIF_RSP_OKAY => Some(Status::Okay),
            BLKIF_RSP_ERROR => Some(Status::Error),
            BLKIF_RSP_EOPNOTSUPP => Some(Status::NotSupported),
            _ => None,
        }
    }
}

/// The operations that carry segments (or order writes), decoded from a request's opcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RwOp {
    /// BLKIF_OP_READ.
    Read,
    /// BLKIF_OP_WRITE.
    Write,
    /// BLKIF_OP_WRITE_BARRIER.
    Barrier,
    /// BLKIF_OP_FLUSH_DISKCACHE.
    Flush,
}

impl RwOp {
    /// The opcode on the ring.
    pub const fn code(self) -> u8 {
        match self {
            RwOp::Read => BLKIF_OP_READ,
            RwOp::Write => BLKIF_OP_WRITE,
            RwOp::Barrier => BLKIF_OP_WRITE_BARRIER,
            RwOp::Flush => BLKIF_OP_FLUSH_DISKCACHE,
        }
    }

    /// An opcode read off the ring, if it is one of these.
    pub const fn from_code(code: u8) -> Option<RwOp> {
        match code {
            BLKIF_OP_READ => Some(RwOp::Read),
            BLKIF_OP_WRITE => Some(RwOp::Write),
            BLKIF_OP_WRITE_BARRIER => Some(RwOp::Barrier),
            BLKIF_OP_FLUSH_DISKCACHE => Some(RwOp::Flush),
            _ => None,
        }
    }

    /// A flush or barrier: orders earlier writes, data or not.
    pub const fn is_flush(self) -> bool {
        matches!(self, RwOp::Barrier | RwOp::Flush)
    }
}

/// A response status as a person reads it: its name, number and meaning, e.g.
/// `BLKIF_RSP_ERROR (-1: the request failed)`.
pub fn status_name(status: i16) -> String {
    match status {
        BLKIF_RSP_OKAY => "BLKIF_RSP_OKAY (0: done)".to_string(),
        BLKIF_RSP_ERROR => "BLKIF_RSP_ERROR (-1: the request failed)".to_string(),
        BLKIF_RSP_EOPNOTSUPP => "BLKIF_RSP_EOPNOTSUPP (-2: not supported)".to_string(),
        other => format!("{other} (not a blkif status)"),
    }
}

/// Segments in a direct request.
pub const BLKIF_MAX_SEGMENTS_PER_REQUEST: usize = 11;
/// Indirect pages in one request.
pub const BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST: usize = 8;
/// Segment descriptors (8 bytes each) in one indirect page.
pub const SEGMENTS_PER_INDIRECT_PAGE: usize = XEN_PAGE_SIZE / SEGMENT_SIZE;
/// Discard flag: secure erase.
pub const BLKIF_DISCARD_SECURE: u8 = 1;

/// `info` bit: CD-ROM.
pub const VDISK_CDROM: u32 = 0x1;
/// `info` bit: removable.
pub const VDISK_REMOVABLE: u32 = 0x2;
/// `info` bit: read-only.
pub const VDISK_READONLY: u32 = 0x4;

/// A Xen page.
pub const XEN_PAGE_SIZE: usize = 4096;
/// The ring's index header: four u32 indices and padding up to the entries.
pub const RING_HEADER_SIZE: usize = 64;
/// Bytes of one segment descriptor: gref u32, first_sect u8, last_sect u8, 2 pad.
pub const SEGMENT_SIZE: usize = 8;
/// The largest ring: 2^4 pages.
pub const MAX_RING_PAGE_ORDER: u32 = 4;

/// Offsets of the shared ring header's indices.
pub mod header {
    /// Frontend's request producer.
    pub const REQ_PROD: usize = 0;
    /// Where the backend wants its next request notification.
    pub const REQ_EVENT: usize = 4;
    /// Backend's response producer.
    pub const RSP_PROD: usize = 8;
    /// Where the frontend wants its next response notification.
    pub const RSP_EVENT: usize = 12;
}

/// Byte offsets of the fields of one wire layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Bytes per ring entry (a request/response union).
    pub entry_size: usize,
    /// Request `id` (u64).
    pub id: usize,
    /// Request `sector_number` (u64).
    pub sector_number: usize,
    /// Read/write: first segment.
    pub segments: usize,
    /// Discard: `nr_sectors` (u64).
    pub discard_nr_sectors: usize,
    /// Indirect: `handle` (u16).
    pub indirect_handle: usize,
    /// Indirect: `indirect_grefs[8]` (u32 each).
    pub indirect_grefs: usize,
    /// Bytes of a response.
    pub response_size: usize,
}

/// Common to both layouts: `operation` u8 @0, then `nr_segments` u8 (rw) / `flag` u8
/// (discard) / `indirect_op` u8 (indirect) @1, then `handle` u16 (rw, discard) or
/// `nr_segments` u16 (indirect) @2. Responses: id u64 @0, operation u8 @8, status i16 @10.
pub mod common {
    /// `operation`.
    pub const OPERATION: usize = 0;
    /// `nr_segments` (rw), `flag` (discard) or `indirect_op` (indirect).
    pub const BYTE1: usize = 1;
    /// `handle` (rw, discard) or `nr_segments` u16 (indirect).
    pub const WORD2: usize = 2;
    /// Response `id`.
    pub const RSP_ID: usize = 0;
    /// Response `operation`.
    pub const RSP_OPERATION: usize = 8;
    /// Response `status`.
    pub const RSP_STATUS: usize = 10;
}

/// The 64-bit layout (x86_64 and arm): natural alignment, 112-byte entries.
pub const LAYOUT_64: Layout = Layout {
    entry_size: 112,
    id: 8,
    sector_number: 16,
    segments: 24,
    discard_nr_sectors: 24,
    indirect_handle: 24,
    indirect_grefs: 28,
    response_size: 16,
};

/// The x86_32 layout: 4-byte aligned u64s (packed), 108-byte entries.
pub const LAYOUT_32: Layout = Layout {
    entry_size: 108,
    id: 4,
    sector_number: 12,
    segments: 20,
    discard_nr_sectors: 20,
    indirect_handle: 20,
    indirect_grefs: 24,
    response_size: 12,
};

/// The largest entry of any layout.
pub const MAX_ENTRY_SIZE: usize = 112;

/// Which layout the frontend uses (its `protocol` key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `x86_64-abi` or `arm-abi`.
    X86_64,
    /// `x86_32-abi`.
    X86_32,
}

impl Protocol {
    /// Reads the frontend's `protocol` key. A missing key means the native (64-bit) layout,
    /// as QEMU decides; every maintained frontend writes the key (Linux always does).
    pub fn from_xenstore(value: Option<&str>) -> Result<Protocol, String> {
        match value.map(str::trim) {
            None | Some("x86_64-abi") | Some("arm-abi") => Ok(Protocol::X86_64),
            Some("x86_32-abi") => Ok(Protocol::X86_32),
            Some(other) => Err(format!(
                "frontend key protocol: unknown ABI `{}`",
                other.escape_debug()
            )),
        }
    }

    /// The field offsets.
    pub const fn layout(self) -> &'static Layout {
        match self {
            Protocol::X86_64 => &LAYOUT_64,
            Protocol::X86_32 => &LAYOUT_32,
        }
    }

    /// The `protocol` value a frontend of this layout writes.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::X86_64 => "x86_64-abi",
            Protocol::X86_32 => "x86_32-abi",
        }
    }
}

/// Entries in a ring of `2^order` pages: the largest power of two that fits after the
/// header (ring.h's `__RD32`). The same for both layouts: 32, 64, 128, 256, 512.
pub const fn ring_entries(order: u32, entry_size: usize) -> u32 {
    let fit = ((XEN_PAGE_SIZE << order) - RING_HEADER_SIZE) / entry_size;
    if fit == 0 {
        0
    } else {
        1 << (usize::BITS - 1 - fit.leading_zeros())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_sizes_match_ring_h() {
        for (order, want) in [(0, 32), (1, 64), (2, 128), (3, 256), (4, 512)] {
            assert_eq!(ring_entries(order, 112), want);
            assert_eq!(ring_entries(order, 108), want);
        }
    }

    #[test]
    fn protocols_parse() {
        assert_eq!(
            Protocol::from_xenstore(Some("x86_32-abi")),
            Ok(Protocol::X86_32)
        );
        assert_eq!(
            Protocol::from_xenstore(Some("arm-abi")),
            Ok(Protocol::X86_64)
        );
        assert_eq!(Protocol::from_xenstore(None), Ok(Protocol::X86_64));
        assert!(Protocol::from_xenstore(Some("native")).is_err());
        assert_eq!(SEGMENTS_PER_INDIRECT_PAGE, 512);
    }

    #[test]
    fn statuses_are_named() {
        assert_eq!(status_name(-1), "BLKIF_RSP_ERROR (-1: the request failed)");
        assert_eq!(status_name(-2), "BLKIF_RSP_EOPNOTSUPP (-2: not supported)");
        assert_eq!(status_name(0), "BLKIF_RSP_OKAY (0: done)");
        assert_eq!(status_name(7), "7 (not a blkif status)");
    }
}
