//! The keys a backend publishes: limits before InitWait, the disk's properties at Connect.
//!
//! Each feature is advertised only when it works end to end: flush and barrier when the
//! plugin has a volatile cache to flush, discard when the plugin discards natively and the
//! disk is writable (PROTOCOL.md §3.3, §4 items 1 and 8).

use xen_disk_plugin_api::DiskInfo;

/// `info` bit: the disk is read-only.
pub const VDISK_READONLY: u32 = 0x4;

/// What this host offers, whatever the plugin.
#[derive(Debug, Clone, Copy)]
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

/// Keys written before switching to InitWait.
pub fn initwait_keys(offer: &HostOffer) -> Vec<(&'static str, String)> {
    let mut keys = vec![
        ("max-ring-page-order", offer.max_ring_page_order.to_string()),
        ("multi-queue-max-queues", offer.max_queues.to_string()),
        (
            "feature-persistent",
            u32::from(offer.persistent).to_string(),
        ),
    ];
    // blkif.h: omit the key entirely when indirect descriptors are not supported.
    if offer.max_indirect_segments > 0 {
        keys.push((
            "feature-max-indirect-segments",
            offer.max_indirect_segments.to_string(),
        ));
    }
    keys
}

/// Keys written in the Connect transaction. `info` is the guarded disk's view (host
/// read-only override applied).
pub fn connect_keys(info: &DiskInfo) -> Vec<(&'static str, String)> {
    let flush = u32::from(info.can_flush);
    let mut keys = vec![
        ("sectors", (info.size / 512).to_string()),
        (
            "info",
            if info.read_only { VDISK_READONLY } else { 0 }.to_string(),
        ),
        ("sector-size", info.logical_sector_size.to_string()),
        (
            "physical-sector-size",
            info.physical_sector_size.to_string(),
        ),
        ("feature-flush-cache", flush.to_string()),
        ("feature-barrier", flush.to_string()),
    ];
    if info.can_discard && !info.read_only {
        let granularity = info.discard_granularity.max(info.physical_sector_size);
        keys.push(("feature-discard", "1".into()));
        keys.push(("discard-granularity", granularity.to_string()));
        keys.push(("discard-alignment", "0".into()));
        keys.push(("discard-secure", "0".into()));
    } else {
        keys.push(("feature-discard", "0".into()));
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get<'a>(keys: &'a [(&'static str, String)], k: &str) -> Option<&'a str> {
        keys.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str())
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
        assert_eq!(get(&k, "info"), Some("0"));
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
