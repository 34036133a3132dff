//! `delay`: a filter that adds latency to its base disk, for testing how guests and
//! stacks behave on a slow disk.
//!
//! | key | type | default | meaning |
//! |---|---|---|---|
//! | `read_ms` | integer | `0` | milliseconds to sleep before each read |
//! | `write_ms` | integer | `0` | before each write, discard and write-zeroes |
//! | `flush_ms` | integer | `0` | before each flush |
//! | `jitter_ms` | integer | `0` | up to this many extra milliseconds, uniformly random per request |
//!
//! ```text
//! xen-disk-host check delay -c read_ms=5 -c jitter_ms=3 -c base=file -c base.path=disk.img
//! ```
//!
//! A request sleeps on the worker thread that carries it, then goes to the base unchanged:
//! requests on different workers overlap their delays, as on a real slow device. The disk is the base's:
//! same size, capabilities and thread model.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use xen_disk_plugin_api::*;

/// The filter's disk.
pub struct DelayDisk {
    base: ForeignDisk,
    read: Duration,
    write: Duration,
    flush: Duration,
    jitter_ms: u64,
    rng: AtomicU64,
}

/// One xorshift64 step: cheap, lock-free and good enough for spreading latencies.
fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

impl DelayDisk {
    fn wait(&self, base: Duration) {
        let extra = if self.jitter_ms == 0 {
            0
        } else {
            let prev = self
                .rng
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |x| Some(xorshift(x)))
                .unwrap_or(1);
            xorshift(prev) % (self.jitter_ms + 1)
        };
        let total = base + Duration::from_millis(extra);
        if !total.is_zero() {
            std::thread::sleep(total);
        }
    }
}

impl Disk for DelayDisk {
    fn info(&self) -> DiskInfo {
        self.base.info()
    }
    fn read(&self, offset: u64, bufs: &mut ReadBufs<'_>) -> Result<()> {
        self.wait(self.read);
        self.base.read(offset, bufs)
    }
    fn write(&self, offset: u64, bufs: &WriteBufs<'_>) -> Result<()> {
        self.wait(self.write);
        self.base.write(offset, bufs)
    }
    fn write_fua(&self, offset: u64, bufs: &WriteBufs<'_>) -> Result<()> {
        self.wait(self.write);
        self.base.write_fua(offset, bufs)
    }
    fn flush(&self) -> Result<()> {
        self.wait(self.flush);
        self.base.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.wait(self.write);
        self.base.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.wait(self.write);
        self.base.write_zeroes(offset, len)
    }
}

/// The filter.
pub struct DelayFilter;

/// No delay may exceed a minute: a typo should not hang a guest for days.
const MAX_MS: u64 = 60_000;

fn ms(config: &Config, key: &str) -> Result<u64> {
    let v = config.u64(key)?;
    if v > MAX_MS {
        return Err(Error::config(
            key,
            format!("{v} ms is over the {MAX_MS} ms limit"),
        ));
    }
    Ok(v)
}

impl Filter for DelayFilter {
    type Disk = DelayDisk;
    const NAME: &'static str = "delay";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "Adds latency to reads, writes and flushes of its base";
    const CONFIG_KEYS: &'static [ConfigKey] = &[
        ConfigKey::optional(
            "read_ms",
            KeyType::Integer,
            "0",
            "Milliseconds before each read",
        ),
        ConfigKey::optional(
            "write_ms",
            KeyType::Integer,
            "0",
            "Milliseconds before each write",
        ),
        ConfigKey::optional(
            "flush_ms",
            KeyType::Integer,
            "0",
            "Milliseconds before each flush",
        ),
        ConfigKey::optional(
            "jitter_ms",
            KeyType::Integer,
            "0",
            "Up to this many random extra milliseconds per request",
        ),
    ];

    fn open(config: &Config, base: ForeignDisk) -> Result<DelayDisk> {
        Ok(DelayDisk {
            base,
            read: Duration::from_millis(ms(config, "read_ms")?),
            write: Duration::from_millis(ms(config, "write_ms")?),
            flush: Duration::from_millis(ms(config, "flush_ms")?),
            jitter_ms: ms(config, "jitter_ms")?,
            rng: AtomicU64::new(0x9e37_79b9_7f4a_7c15),
        })
    }
}

export_filter!(DelayFilter);
