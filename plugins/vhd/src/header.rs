//! The 1024-byte dynamic disk header that the footer's data offset points at (dynamic and
//! differencing disks): where the BAT is, the block size, and for differencing disks the
//! parent's UUID, name and locators.

use crate::footer::{be32, be64, checksum};
use xen_disk_plugin_api::{Error, Result};

pub const HEADER_SIZE: usize = 1024;
pub const COOKIE: &[u8; 8] = b"cxsparse";
/// Relative Windows path, UTF-16LE.
pub const PLAT_W2RU: u32 = 0x5732_7275;
/// Absolute Windows path, UTF-16LE.
pub const PLAT_W2KU: u32 = 0x5732_6b75;
/// Mac OS X file URL, UTF-8.
pub const PLAT_MACX: u32 = 0x4d61_6358;
/// Deprecated (pre-Unicode) Windows relative path, in ANSI characters: old tools wrote it.
pub const PLAT_WI2R: u32 = 0x5769_3272;
/// Deprecated (pre-Unicode) Windows absolute path, in ANSI characters.
pub const PLAT_WI2K: u32 = 0x5769_326b;

/// One parent locator entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Locator {
    pub code: u32,
    pub space: u32,
    pub len: u32,
    pub offset: u64,
}

/// A validated dynamic disk header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub table_offset: u64,
    pub max_table_entries: u32,
    pub block_size: u32,
    pub parent_uuid: [u8; 16],
    pub parent_timestamp: u32,
    pub parent_name: String,
    pub locators: Vec<Locator>,
}

impl Header {
    pub fn parse(b: &[u8; HEADER_SIZE], file: &str) -> Result<Header> {
        if &b[0..8] != COOKIE {
            return Err(Error::corrupt(format!(
                "{file}: dynamic header cookie is not \"cxsparse\""
            )));
        }
        let (stored, want) = (be32(b, 36), checksum(b, 36));
        if stored != want {
            return Err(Error::corrupt(format!(
                "{file}: dynamic header checksum is {stored:#010x}, computed {want:#010x}"
            )));
        }
        let version = be32(b, 24);
        if version >> 16 != 1 {
            return Err(Error::corrupt(format!(
                "{file}: dynamic header version {version:#x} is not supported"
            )));
        }
        let block_size = be32(b, 32);
        if !block_size.is_power_of_two() || !(4096..=(256 << 20)).contains(&block_size) {
            return Err(Error::corrupt(format!(
                "{file}: dynamic header block size {block_size} is not a power of two from 4 KiB to 256 MiB"
            )));
        }
        let table_offset = be64(b, 16);
        if !table_offset.is_multiple_of(512) {
            return Err(Error::corrupt(format!(
                "{file}: dynamic header table offset {table_offset:#x} is not sector-aligned"
            )));
        }
        let mut parent_uuid = [0; 16];
        parent_uuid.copy_from_slice(&b[40..56]);
        let units: Vec<u16> = b[64..576]
            .chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        let parent_name = String::from_utf16_lossy(&units);
        let locators = (0..8)
            .map(|i| 576 + i * 24)
            .map(|at| Locator {
                code: be32(b, at),
                space: be32(b, at + 4),
                len: be32(b, at + 8),
                offset: be64(b, at + 16),
            })
            .filter(|l| l.code != 0)
            .collect();
        Ok(Header {
            table_offset,
            max_table_entries: be32(b, 28),
            block_size,
            parent_uuid,
            parent_timestamp: be32(b, 56),
            parent_name,
            locators,
        })
    }

    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(COOKIE);
        b[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        b[16..24].copy_from_slice(&self.table_offset.to_be_bytes());
        b[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        b[28..32].copy_from_slice(&self.max_table_entries.to_be_bytes());
        b[32..36].copy_from_slice(&self.block_size.to_be_bytes());
        b[40..56].copy_from_slice(&self.parent_uuid);
        b[56..60].copy_from_slice(&self.parent_timestamp.to_be_bytes());
        for (i, u) in self.parent_name.encode_utf16().take(255).enumerate() {
            b[64 + 2 * i..66 + 2 * i].copy_from_slice(&u.to_be_bytes());
        }
        for (i, l) in self.locators.iter().take(8).enumerate() {
            let at = 576 + i * 24;
            b[at..at + 4].copy_from_slice(&l.code.to_be_bytes());
            b[at + 4..at + 8].copy_from_slice(&l.space.to_be_bytes());
            b[at + 8..at + 12].copy_from_slice(&l.len.to_be_bytes());
            b[at + 16..at + 24].copy_from_slice(&l.offset.to_be_bytes());
        }
        let sum = checksum(&b, 36);
        b[36..40].copy_from_slice(&sum.to_be_bytes());
        b
    }

    /// Bytes of the sector bitmap in front of each block (one bit per sector, padded to 512).
    pub fn bitmap_size(&self) -> u64 {
        (u64::from(self.block_size) / 512)
            .div_ceil(8)
            .next_multiple_of(512)
    }
}
