//! Virtual block device numbers: the `virtual-device` key and the guest's device names.
//!
//! Xen encodes a guest disk as a number (docs/misc/vbd-interface): disks 0..15 as
//! `202 << 8 | disk << 4 | partition` (xvda..xvdp), larger disks as
//! `1 << 28 | disk << 8 | partition`. Linux guests name them `xvd` + letters.

/// A guest disk: its index (0 = xvda) and partition (0 = whole disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Vbd {
    /// Disk index: 0 is xvda.
    pub disk: u32,
    /// Partition, 0 for the whole disk.
    pub partition: u32,
}

/// The most disks the extended encoding can name (disk fits in 20 bits).
pub const MAX_DISK: u32 = (1 << 20) - 1;

impl Vbd {
    /// Disk `disk`, whole.
    pub fn disk(disk: u32) -> Self {
        Vbd { disk, partition: 0 }
    }

    /// The `virtual-device` number.
    pub fn number(self) -> u32 {
        if self.disk < 16 && self.partition < 16 {
            (202 << 8) | (self.disk << 4) | self.partition
        } else {
            (1 << 28) | (self.disk << 8) | (self.partition & 0xff)
        }
    }

    /// Decodes a `virtual-device` number in the Xen encodings (and the legacy IDE/SCSI ones
    /// a toolstack may still write), or `None` for anything else.
    pub fn from_number(n: u32) -> Option<Vbd> {
        if n & (1 << 28) != 0 {
            let disk = (n >> 8) & 0xfffff;
            return Some(Vbd {
                disk,
                partition: n & 0xff,
            });
        }
        let (major, minor) = (n >> 8, n & 0xff);
        match major {
            202 => Some(Vbd {
                disk: minor >> 4,
                partition: minor & 0xf,
            }),
            // IDE: hda/hdb on 3, hdc/hdd on 22; 64 minors per disk.
            3 => Some(Vbd {
                disk: minor >> 6,
                partition: minor & 0x3f,
            }),
            22 => Some(Vbd {
                disk: 2 + (minor >> 6),
                partition: minor & 0x3f,
            }),
            // SCSI sda..sdp on 8: 16 minors per disk.
            8 => Some(Vbd {
                disk: minor >> 4,
                partition: minor & 0xf,
            }),
            _ => None,
        }
    }

    /// The Linux guest's name for it: `xvda`, `xvdz`, `xvdaa`, … with the partition number.
    pub fn linux_name(self) -> String {
        let mut letters = Vec::new();
        let mut d = self.disk as i64;
        loop {
            letters.push(b'a' + (d % 26) as u8);
            d = d / 26 - 1;
            if d < 0 {
                break;
            }
        }
        letters.reverse();
        let mut name = format!("xvd{}", String::from_utf8_lossy(&letters));
        if self.partition > 0 {
            name.push_str(&self.partition.to_string());
        }
        name
    }

    /// Parses `xvdb`, `xvdaa3` or a number.
    pub fn parse(text: &str) -> Option<Vbd> {
        if let Ok(n) = text.parse::<u32>() {
            return Vbd::from_number(n);
        }
        let rest = text.strip_prefix("xvd")?;
        let letters_end = rest
            .find(|c: char| !c.is_ascii_lowercase())
            .unwrap_or(rest.len());
        let (letters, part) = rest.split_at(letters_end);
        if letters.is_empty() || letters.len() > 4 {
            return None;
        }
        let mut disk: u64 = 0;
        for b in letters.bytes() {
            disk = disk * 26 + u64::from(b - b'a' + 1);
        }
        let disk = u32::try_from(disk - 1).ok().filter(|&d| d <= MAX_DISK)?;
        let partition = if part.is_empty() {
            0
        } else {
            part.parse().ok().filter(|&p| p < 256)?
        };
        Some(Vbd { disk, partition })
    }
}

/// The first disk index not used by any of `existing` (the guest's `device/vbd` entries),
/// skipping xvda (index 0) which the guest's own boot disk usually is.
pub fn next_free<'a>(existing: impl IntoIterator<Item = &'a str>) -> Option<Vbd> {
    let used: std::collections::HashSet<u32> = existing
        .into_iter()
        .filter_map(|s| s.parse::<u32>().ok())
        .filter_map(Vbd::from_number)
        .map(|v| v.disk)
        .collect();
    (1..=MAX_DISK).find(|d| !used.contains(d)).map(Vbd::disk)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_names_round_trip() {
        assert_eq!(Vbd::disk(0).number(), 51712);
        assert_eq!(Vbd::disk(1).number(), 51728);
        assert_eq!(Vbd::disk(1).linux_name(), "xvdb");
        assert_eq!(Vbd::disk(25).linux_name(), "xvdz");
        assert_eq!(Vbd::disk(26).linux_name(), "xvdaa");
        assert_eq!(Vbd::disk(26).number(), (1 << 28) | (26 << 8));
        for d in [0, 1, 15, 16, 26, 701, 702, 5000] {
            let v = Vbd::disk(d);
            assert_eq!(Vbd::from_number(v.number()), Some(v));
            assert_eq!(Vbd::parse(&v.linux_name()), Some(v), "{}", v.linux_name());
        }
        assert_eq!(
            Vbd::parse("xvdb3"),
            Some(Vbd {
                disk: 1,
                partition: 3
            })
        );
        assert_eq!(Vbd::parse("51728"), Some(Vbd::disk(1)));
        for bad in ["", "xvd", "sda", "xvdB", "xvdzzzzz", "xvda999", "7"] {
            assert_eq!(Vbd::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn next_free_skips_used_and_xvda() {
        assert_eq!(next_free([]), Some(Vbd::disk(1)));
        assert_eq!(next_free(["51712", "51728", "garbage"]), Some(Vbd::disk(2)));
        assert_eq!(next_free(["51744"]), Some(Vbd::disk(1)));
    }
}
