//! The qcow2 header (cluster 0) and its extensions, parsed into a validated [`Header`].
//!
//! This is the edge where untrusted bytes from the image become numbers the rest of the
//! plugin may use: every offset, size and count is bounded here, and each refusal names the
//! file and the field.

use xen_disk_plugin_api::{Error, Result};

pub const MAGIC: u32 = 0x5146_49fb; // "QFI\xfb"
/// Largest virtual size accepted (QEMU's own limit is 2^55 bytes... 32 PiB is plenty).
pub const MAX_SIZE: u64 = 1 << 55;
/// Largest L1 table accepted, in bytes (the same bound QEMU uses).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table accepted, in bytes.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;

pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_EXTERNAL_DATA: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION_TYPE: u64 = 1 << 3;
pub const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;

pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

/// A validated header.
#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Parses and bounds a header. `first` holds the start of the file (up to 2 MiB, or the
    /// whole file when shorter); `file_len` is the file's length.
    pub fn parse(name: &str, first: &[u8], file_len: u64) -> Result<Header> {
        let bad = |field: &str, why: String| {
            Error::corrupt(format!("{name}: header field {field}: {why}"))
        };
        if first.len() < 72 {
            return Err(bad(
                "magic",
                format!("file too short ({} bytes)", first.len()),
            ));
        }
        if be32(first, 0) != MAGIC {
            return Err(bad("magic", "not a qcow2 image".into()));
        }
        let version = be32(first, 4);
        if version != 2 && version != 3 {
            return Err(bad("version", format!("{version} is not 2 or 3")));
        }
        let cluster_bits = be32(first, 20);
        if !(12..=21).contains(&cluster_bits) {
            return Err(bad(
                "cluster_bits",
                format!("{cluster_bits} is outside 12..=21"),
            ));
        }
        let cs = 1u64 << cluster_bits;
        let size = be64(first, 24);
        if size > MAX_SIZE {
            return Err(bad("size", format!("{size} exceeds {MAX_SIZE}")));
        }
        let crypt = be32(first, 32);
        if crypt != 0 {
            return Err(bad(
                "crypt_method",
                format!("{crypt}: encrypted images are not supported"),
            ));
        }
        let l1_size = be32(first, 36);
        let l1_table_offset = be64(first, 40);
        let refcount_table_offset = be64(first, 48);
        let refcount_table_clusters = be32(first, 56);
        let nb_snapshots = be32(first, 60);
        let (mut incompat, mut compat, mut autoclear, mut refcount_order, mut header_length) =
            (0, 0, 0, 4, 72);
        if version == 3 {
            if first.len() < 104 {
                return Err(bad(
                    "header_length",
                    "file too short for a v3 header".into(),
                ));
            }
            incompat = be64(first, 72);
            compat = be64(first, 80);
            autoclear = be64(first, 88);
            refcount_order = be32(first, 96);
            header_length = be32(first, 100);
            if header_length < 104
                || u64::from(header_length) > cs
                || header_length as usize > first.len()
            {
                return Err(bad(
                    "header_length",
                    format!("{header_length} is outside 104..={cs}"),
                ));
            }
        }
        if refcount_order > 6 {
            return Err(bad(
                "refcount_order",
                format!("{refcount_order} is above 6"),
            ));
        }
        let unknown = incompat & !(INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION_TYPE);
        if incompat & INCOMPAT_EXTERNAL_DATA != 0 {
            return Err(bad(
                "incompatible_features",
                "external data files are not supported".into(),
            ));
        }
        if incompat & INCOMPAT_EXTENDED_L2 != 0 {
            return Err(bad(
                "incompatible_features",
                "extended L2 entries are not supported".into(),
            ));
        }
        if unknown != 0 {
            return Err(bad(
                "incompatible_features",
                format!("unknown bits {unknown:#x}"),
            ));
        }
        if incompat & INCOMPAT_COMPRESSION_TYPE != 0 {
            let ct = if header_length > 104 { first[104] } else { 0 };
            if ct != 0 {
                return Err(bad(
                    "compression_type",
                    format!("{ct}: only deflate (0) is supported"),
                ));
            }
        }
        let aligned = |v: u64| v.is_multiple_of(cs);
        // L1 table: must cover the virtual size and lie inside the file.
        let l2_entries = cs / 8;
        let need_l1 = size.div_ceil(cs * l2_entries);
        if u64::from(l1_size) < need_l1 || u64::from(l1_size) * 8 > MAX_L1_BYTES {
            return Err(bad(
                "l1_size",
                format!("{l1_size} (need {need_l1}, at most {})", MAX_L1_BYTES / 8),
            ));
        }
        if l1_size > 0
            && (!aligned(l1_table_offset)
                || l1_table_offset == 0
                || l1_table_offset
                    .checked_add(u64::from(l1_size) * 8)
                    .is_none_or(|e| e > file_len))
        {
            return Err(bad(
                "l1_table_offset",
                format!("{l1_table_offset:#x} unaligned or outside the file ({file_len} bytes)"),
            ));
        }
        let rt_bytes = u64::from(refcount_table_clusters) * cs;
        if refcount_table_clusters == 0 || rt_bytes > MAX_REFTABLE_BYTES {
            return Err(bad(
                "refcount_table_clusters",
                format!("{refcount_table_clusters} is 0 or too large"),
            ));
        }
        if !aligned(refcount_table_offset)
            || refcount_table_offset == 0
            || refcount_table_offset
                .checked_add(rt_bytes)
                .is_none_or(|e| e > file_len)
        {
            return Err(bad(
                "refcount_table_offset",
                format!(
                    "{refcount_table_offset:#x} unaligned or outside the file ({file_len} bytes)"
                ),
            ));
        }
        // Backing file name: inside cluster 0, at most 1023 bytes.
        let bf_off = be64(first, 8);
        let bf_size = be32(first, 16);
        let backing_file = if bf_off == 0 || bf_size == 0 {
            None
        } else {
            if bf_size > 1023
                || bf_off
                    .checked_add(u64::from(bf_size))
                    .is_none_or(|e| e > cs.min(first.len() as u64))
            {
                return Err(bad(
                    "backing_file_offset",
                    format!("{bf_off}+{bf_size} is outside cluster 0"),
                ));
            }
            let s = &first[bf_off as usize..(bf_off + u64::from(bf_size)) as usize];
            Some(
                String::from_utf8(s.to_vec())
                    .map_err(|_| bad("backing_file", "not UTF-8".into()))?,
            )
        };
        // Header extensions, between header_length and the end of cluster 0.
        let mut backing_format = None;
        let end = (cs as usize).min(first.len());
        let mut at = header_length as usize;
        loop {
            if at + 8 > end {
                break;
            }
            let ty = be32(first, at);
            let len = be32(first, at + 4) as usize;
            if ty == EXT_END {
                break;
            }
            let data = at + 8;
            if len > end - data {
                return Err(bad(
                    "header extension",
                    format!("{ty:#x} length {len} runs past cluster 0"),
                ));
            }
            if ty == EXT_BACKING_FORMAT {
                let s = &first[data..data + len];
                backing_format = Some(
                    String::from_utf8(s.to_vec())
                        .map_err(|_| bad("backing format", "not UTF-8".into()))?,
                );
            }
            at = data + len.div_ceil(8) * 8;
        }
        Ok(Header {
            version,
            backing_file,
            backing_format,
            cluster_bits,
            size,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            incompatible_features: incompat,
            compatible_features: compat,
            autoclear_features: autoclear,
            refcount_order,
            header_length,
        })
    }
}

/// Encodes a fresh v3 header for `create`, with the backing name and format in cluster 0.
#[allow(clippy::too_many_arguments)]
pub fn encode_v3(
    cluster_bits: u32,
    size: u64,
    l1_size: u32,
    l1_table_offset: u64,
    refcount_table_offset: u64,
    refcount_table_clusters: u32,
    backing: Option<(&str, &str)>,
) -> Vec<u8> {
    let mut h = vec![0u8; 104];
    h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&3u32.to_be_bytes());
    h[20..24].copy_from_slice(&cluster_bits.to_be_bytes());
    h[24..32].copy_from_slice(&size.to_be_bytes());
    h[36..40].copy_from_slice(&l1_size.to_be_bytes());
    h[40..48].copy_from_slice(&l1_table_offset.to_be_bytes());
    h[48..56].copy_from_slice(&refcount_table_offset.to_be_bytes());
    h[56..60].copy_from_slice(&refcount_table_clusters.to_be_bytes());
    h[96..100].copy_from_slice(&4u32.to_be_bytes());
    h[100..104].copy_from_slice(&104u32.to_be_bytes());
    if let Some((file, format)) = backing {
        h.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        h.extend_from_slice(&(format.len() as u32).to_be_bytes());
        h.extend_from_slice(format.as_bytes());
        h.resize(h.len().div_ceil(8) * 8, 0);
        h.extend_from_slice(&[0u8; 8]);
        let off = h.len() as u64;
        h[8..16].copy_from_slice(&off.to_be_bytes());
        h[16..20].copy_from_slice(&(file.len() as u32).to_be_bytes());
        h.extend_from_slice(file.as_bytes());
    } else {
        h.extend_from_slice(&[0u8; 8]);
    }
    h
}
