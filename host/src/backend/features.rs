//! The advertisement: everything a backend tells the guest about a disk, derived in one
//! place from what the host offers ([`HostOffer`]) and what the disk can do (the guarded
//! [`DiskInfo`]).
//!
//! ```text
//!  HostOffer ──────────────▶ initwait_keys   (ring order, queues, persistent, indirect)
//!  HostOffer + DiskInfo ─▶ Advertisement ─▶ connect_keys (sectors, info, features)
//!                                        └▶ limits       (what the ring accepts)
//! ```
//!
//! Each feature is advertised only when it works end to end: flush and barrier when the
//! plugin has a volatile cache to flush, discard when the plugin discards natively and the
//! disk is writable. The ring checks requests against the same decisions, so a guest is
//! never refused what it was offered, nor served what it was not. Adding a key means one
//! line in [`initwait_keys`] or [`Advertisement::connect_keys`] (plus a field here if it
//! needs a decision), and its use.

use crate::blkif::abi::VDISK_READONLY;
use crate::blkif::keys::*;
use crate::blkif::request::Limits;
use xen_disk_plugin_api::DiskInfo;

/// What this host offers, whatever the plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostOffer {
    /// `max-ring-page-order` (≤ 4).
    pub max_ring_page_order: u32,
    /// `multi-queue-max-queues` (≤ CPUs).
    pub max_queues: u32,
    /// `feature-max-indirect-segments`, 0 = not offered.
    pub max_indirect_segments: u32,
    /// `feature-persistent`.
    pub persistent: bool,
}

impl HostOffer {
    /// What a host with `cpus` CPUs offers by default: the largest rings, a queue per CPU
    /// (at most `queues`), 256 indirect segments and persistent grants.
    pub fn standard(queues: u32, cpus: u32) -> HostOffer {
        HostOffer {
            max_ring_page_order: crate::blkif::abi::MAX_RING_PAGE_ORDER,
            max_queues: queues.min(cpus).max(1),
            max_indirect_segments: 256,
            persistent: true,
        }
    }
}

/// Keys written before switching to InitWait.
pub fn initwait_keys(offer: &HostOffer) -> Vec<(&'static str, String)> {
    let mut keys = vec![
        (
            MAX_RING_PAGE_ORDER_KEY,
            offer.max_ring_page_order.to_string(),
        ),
        (MULTI_QUEUE_MAX_QUEUES, offer.max_queues.to_string()),
        (FEATURE_PERSISTENT, u32::from(offer.persistent).to_string()),
    ];
    // blkif.h: omit the key entirely when indirect descriptors are not supported.
    if offer.max_indirect_segments > 0 {
        keys.push((
            FEATURE_MAX_INDIRECT_SEGMENTS,
            offer.max_indirect_segments.to_string(),
        ));
    }
    keys
}

/// What the guest is told about one disk at Connect, decided once.
#[derive(Debug, Clone, Copy)]
pub struct Advertisement {
    /// The guarded disk's view (host read-only override applied).
    pub info: DiskInfo,
    /// Indirect segments offered (0: none).
    pub max_indirect_segments: u16,
    /// `feature-flush-cache` and `feature-barrier`.
    pub flush: bool,
    /// `feature-discard`.
    pub discard: bool,
}

impl Advertisement {
    /// The decisions for `info` under `offer`.
    pub fn new(offer: &HostOffer, info: &DiskInfo) -> Advertisement {
        Advertisement {
            info: *info,
            max_indirect_segments: u16::try_from(offer.max_indirect_segments).unwrap_or(u16::MAX),
            flush: info.can_flush,
            discard: info.can_discard && !info.read_only,
        }
    }

    /// Keys written in the Connect transaction.
    pub fn connect_keys(&self) -> Vec<(&'static str, String)> {
        let info = &self.info;
        let flush = u32::from(self.flush);
        let mut keys = vec![
            (SECTORS, (info.size / 512).to_string()),
            (
                INFO,
                if info.read_only { VDISK_READONLY } else { 0 }.to_string(),
            ),
            (SECTOR_SIZE, info.logical_sector_size.to_string()),
            (PHYSICAL_SECTOR_SIZE, info.physical_sector_size.to_string()),
            (FEATURE_FLUSH_CACHE, flush.to_string()),
            (FEATURE_BARRIER, flush.to_string()),
        ];
        if self.discard {
            let granularity = info.discard_granularity.max(info.physical_sector_size);
            keys.push((FEATURE_DISCARD, "1".into()));
            keys.push((DISCARD_GRANULARITY, granularity.to_string()));
            // Where the granules start (plugin ABI 1.1); the guard keeps it below the
            // granularity, and plugins built before 1.1 leave it 0.
            keys.push((DISCARD_ALIGNMENT, info.discard_alignment.to_string()));
            keys.push((DISCARD_SECURE, "0".into()));
        } else {
            keys.push((FEATURE_DISCARD, "0".into()));
        }
        keys
    }

    /// What the ring accepts: exactly what was advertised.
    pub fn limits(&self) -> Limits {
        Limits {
            sectors: self.info.size / 512,
            logical_sector_size: self.info.logical_sector_size,
            read_only: self.info.read_only,
            flush: self.flush,
            discard: self.discard,
            discard_secure: false,
            max_indirect_segments: self.max_indirect_segments,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get<'a>(keys: &'a [(&'static str, String)], k: &str) -> Option<&'a str> {
        keys.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str())
    }

    fn connect_keys(info: &DiskInfo) -> Vec<(&'static str, String)> {
        Advertisement::new(&HostOffer::standard(1, 1), info).connect_keys()
    }

    #[test]
    fn the_ring_accepts_what_was_advertised() {
        let offer = HostOffer::standard(1, 1);
        for info in [
            DiskInfo::new(1 << 20),
            DiskInfo::new(1 << 20).flush(true).discard(true),
            DiskInfo::new(1 << 20).discard(true).read_only(true),
        ] {
            let ad = Advertisement::new(&offer, &info);
            let (keys, limits) = (ad.connect_keys(), ad.limits());
            assert_eq!(get(&keys, FEATURE_FLUSH_CACHE) == Some("1"), limits.flush);
            assert_eq!(get(&keys, FEATURE_DISCARD) == Some("1"), limits.discard);
            assert_eq!(get(&keys, INFO) == Some("4"), limits.read_only);
            assert_eq!(limits.max_indirect_segments, 256);
        }
    }

    #[test]
    fn features_follow_the_disk() {
        let k = connect_keys(
            &DiskInfo::new(1 << 30)
                .sector_size(4096)
                .flush(true)
                .discard(true),
        );
        assert_eq!(get(&k, "sectors"), Some("2097152"));
        assert_eq!(get(&k, "sector-size"), Some("4096"));
        assert_eq!(get(&k, "feature-flush-cache"), Some("1"));
        assert_eq!(get(&k, "feature-discard"), Some("1"));
        assert_eq!(get(&k, "discard-granularity"), Some("4096"));
        assert_eq!(get(&k, "discard-alignment"), Some("0"));
        assert_eq!(get(&k, "info"), Some("0"));
        let k = connect_keys(
            &DiskInfo::new(1 << 30)
                .discard(true)
                .discard_granularity(65536)
                .discard_alignment(3584),
        );
        assert_eq!(get(&k, "discard-granularity"), Some("65536"));
        assert_eq!(get(&k, "discard-alignment"), Some("3584"));
        let k = connect_keys(&DiskInfo::new(1 << 20).discard(true).read_only(true));
        assert_eq!(get(&k, "feature-flush-cache"), Some("0"));
        assert_eq!(get(&k, "feature-discard"), Some("0"));
        assert_eq!(get(&k, "info"), Some("4"));
    }

    #[test]
    fn indirect_key_is_omitted_when_off() {
        let offer = HostOffer {
            max_ring_page_order: 4,
            max_queues: 2,
            max_indirect_segments: 0,
            persistent: true,
        };
        assert_eq!(
            get(&initwait_keys(&offer), "feature-max-indirect-segments"),
            None
        );
        let offer = HostOffer {
            max_indirect_segments: 256,
            ..offer
        };
        assert_eq!(
            get(&initwait_keys(&offer), "feature-max-indirect-segments"),
            Some("256")
        );
    }
}
