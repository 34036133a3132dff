//! The xenstore keys of the blkif handshake, spelled once: both ends (the backend in
//! `backend`, the simulated guest in `frontend`) use these names.

/// Backend: the largest ring (log2 pages) it maps.
pub const MAX_RING_PAGE_ORDER_KEY: &str = "max-ring-page-order";
/// Backend: the most queues it serves.
pub const MULTI_QUEUE_MAX_QUEUES: &str = "multi-queue-max-queues";
/// Both: persistent grants offered (backend) or used (frontend).
pub const FEATURE_PERSISTENT: &str = "feature-persistent";
/// Backend: segments an indirect request may carry (absent: no indirect requests).
pub const FEATURE_MAX_INDIRECT_SEGMENTS: &str = "feature-max-indirect-segments";
/// Backend: capacity in 512-byte sectors.
pub const SECTORS: &str = "sectors";
/// Backend: VDISK_* bits.
pub const INFO: &str = "info";
/// Backend: logical sector size.
pub const SECTOR_SIZE: &str = "sector-size";
/// Backend: physical sector size.
pub const PHYSICAL_SECTOR_SIZE: &str = "physical-sector-size";
/// Backend: FLUSH_DISKCACHE is served.
pub const FEATURE_FLUSH_CACHE: &str = "feature-flush-cache";
/// Backend: WRITE_BARRIER is served.
pub const FEATURE_BARRIER: &str = "feature-barrier";
/// Backend: DISCARD is served.
pub const FEATURE_DISCARD: &str = "feature-discard";
/// Backend: discard granularity in bytes.
pub const DISCARD_GRANULARITY: &str = "discard-granularity";
/// Backend: discard alignment in bytes.
pub const DISCARD_ALIGNMENT: &str = "discard-alignment";
/// Backend: secure discard is served.
pub const DISCARD_SECURE: &str = "discard-secure";
