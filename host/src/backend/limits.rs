//! Per-disk I/O limits: read and write IOPS and bandwidth, each a token bucket with a burst
//! allowance, shared by the disk's rings and changed live (`ctl limit`).
//!
//! A request over the limit is never refused: the ring thread holds it (and everything the
//! guest queued after it) until its bucket allows it, then serves it as usual. The guest
//! sees a slower disk, as it would behind a busy one.
//!
//! ```text
//!  take ─▶ limiter on? ─ no ──────────────────────────────▶ dispatch
//!                      └ yes ─▶ admit: an IOPS token, and the byte bucket out of debt?
//!                                 ├ yes ─▶ dispatch ─▶ charge the request's bytes
//!                                 └ no ──▶ hold it; sleep until the bucket allows it
//! ```
//!
//! Bytes are charged once a request's segments are known (an indirect request's list is
//! read only when it is prepared), so the byte bucket may go into debt by one request; the
//! next one waits until the debt is paid. Over any span longer than the burst, a disk gets
//! `rate × span + burst` and no more.
//!
//! Flushes and discards are not limited: they move no data through the guest's pages.

use crate::blkif::abi::{RwOp, BLKIF_OP_READ};
use crate::blkif::request::Request;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Which way a limited request moves data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Reads.
    Read,
    /// Writes (and flushes or barriers carrying data).
    Write,
}

impl Dir {
    /// The direction of a request as the guest sent it; None for what is not limited
    /// (flushes and barriers without data, discards, unknown operations).
    pub fn of(req: &Request) -> Option<Dir> {
        match *req {
            Request::ReadWrite { op: RwOp::Read, .. } => Some(Dir::Read),
            Request::ReadWrite {
                op: RwOp::Write, ..
            } => Some(Dir::Write),
            Request::ReadWrite { nr_segments, .. } if nr_segments > 0 => Some(Dir::Write),
            Request::Indirect { indirect_op, .. } if indirect_op == BLKIF_OP_READ => {
                Some(Dir::Read)
            }
            Request::Indirect { .. } => Some(Dir::Write),
            _ => None,
        }
    }
}

/// One limit: a sustained rate and the burst allowed above it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Per second (requests, or bytes).
    pub per_second: u64,
    /// How much may go at once after a quiet spell (requests, or bytes).
    pub burst: u64,
}

impl Rate {
    /// A rate with the default burst: a tenth of a second's worth (at least one request).
    pub fn new(per_second: u64) -> Rate {
        Rate {
            per_second,
            burst: (per_second / 10).max(1),
        }
    }
}

/// A disk's limits; None is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IoLimits {
    /// Read requests per second.
    pub read_iops: Option<Rate>,
    /// Write requests per second.
    pub write_iops: Option<Rate>,
    /// Bytes read per second.
    pub read_bps: Option<Rate>,
    /// Bytes written per second.
    pub write_bps: Option<Rate>,
}

/// The keys limits are set with, in `disks.toml`, on `connect --limit` and `ctl limit`.
pub const LIMIT_KEYS: &[&str] = &[
    "read-iops",
    "write-iops",
    "read-bps",
    "write-bps",
    "read-iops-burst",
    "write-iops-burst",
    "read-bps-burst",
    "write-bps-burst",
];

impl IoLimits {
    /// True when nothing is limited.
    pub fn is_unlimited(&self) -> bool {
        *self == IoLimits::default()
    }

    fn slot(&mut self, name: &str) -> Option<&mut Option<Rate>> {
        Some(match name {
            "read-iops" => &mut self.read_iops,
            "write-iops" => &mut self.write_iops,
            "read-bps" => &mut self.read_bps,
            "write-bps" => &mut self.write_bps,
            _ => return None,
        })
    }

    /// Sets one key (see [`LIMIT_KEYS`]): a rate (`0`, `off` or `unlimited` lifts it; a
    /// `-bps` value may be a size like `20M`, per second) or a burst for a rate that is set.
    /// The error names the key.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let (name, burst) = match key.strip_suffix("-burst") {
            Some(n) => (n, true),
            None => (key, false),
        };
        let bytes = name.ends_with("-bps");
        let Some(slot) = self.slot(name) else {
            return Err(format!(
                "unknown limit `{key}` (known: {})",
                LIMIT_KEYS.join(", ")
            ));
        };
        let v = value.trim();
        let lifted = matches!(v, "off" | "unlimited" | "none");
        let n = if lifted {
            0
        } else if bytes {
            xen_disk_plugin_api::parse_size(v).map_err(|e| format!("`{key}`: {e}"))?
        } else {
            v.parse::<u64>()
                .map_err(|_| format!("`{key}` = {value}: not a whole number (or `off`)"))?
        };
        if burst {
            match slot {
                Some(r) if n > 0 => r.burst = n,
                Some(_) => return Err(format!("`{key}` must be at least 1")),
                None => return Err(format!("`{key}` needs `{name}` set first")),
            }
        } else if n == 0 {
            *slot = None;
        } else {
            *slot = Some(Rate::new(n));
        }
        Ok(())
    }

    /// Sets every `key=value` word in turn; the first bad one is the error.
    pub fn set_words<'a>(
        &mut self,
        words: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), String> {
        for w in words {
            let Some((k, v)) = w.split_once('=') else {
                return Err(format!("`{w}`: expected key=value (e.g. read-iops=500)"));
            };
            self.set(k.trim(), v)?;
        }
        Ok(())
    }

    /// One line: `read-iops=500/s (burst 50) write-bps=20971520/s (burst 2097152)`, or
    /// `unlimited`.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = [
            ("read-iops", self.read_iops),
            ("write-iops", self.write_iops),
            ("read-bps", self.read_bps),
            ("write-bps", self.write_bps),
        ]
        .iter()
        .filter_map(|(k, r)| r.map(|r| format!("{k}={}/s (burst {})", r.per_second, r.burst)))
        .collect();
        if parts.is_empty() {
            "unlimited".into()
        } else {
            parts.join(" ")
        }
    }
}

/// A token bucket on a nanosecond clock.
#[derive(Debug, Clone)]
struct Bucket {
    rate: Rate,
    /// Tokens now (negative: debt).
    level: f64,
    /// When `level` was last brought up to date.
    at: u64,
}

impl Bucket {
    fn new(rate: Rate, now: u64) -> Bucket {
        Bucket {
            rate,
            level: rate.burst as f64,
            at: now,
        }
    }

    fn refill(&mut self, now: u64) {
        let dt = now.saturating_sub(self.at);
        self.at = self.at.max(now);
        self.level = (self.level + dt as f64 * self.rate.per_second as f64 / 1e9)
            .min(self.rate.burst as f64);
    }

    /// Nanoseconds until the level reaches `need` (0: it has).
    fn wait_for(&self, need: f64) -> u64 {
        if self.level >= need {
            0
        } else {
            ((need - self.level) * 1e9 / self.rate.per_second as f64).ceil() as u64
        }
    }
}

/// The buckets for one set of limits.
#[derive(Debug, Default)]
struct Buckets {
    read_iops: Option<Bucket>,
    write_iops: Option<Bucket>,
    read_bps: Option<Bucket>,
    write_bps: Option<Bucket>,
}

impl Buckets {
    fn of(&mut self, dir: Dir) -> (&mut Option<Bucket>, &mut Option<Bucket>) {
        match dir {
            Dir::Read => (&mut self.read_iops, &mut self.read_bps),
            Dir::Write => (&mut self.write_iops, &mut self.write_bps),
        }
    }
}

/// What a limiter holds behind its lock.
#[derive(Debug, Default)]
struct State {
    limits: IoLimits,
    buckets: Buckets,
}

/// A disk's limits in force, for all its rings; read by the ring threads, set by `ctl
/// limit`. When nothing is limited, a ring thread reads one flag per request and nothing
/// else.
#[derive(Debug)]
pub struct Limiter {
    on: AtomicBool,
    state: Mutex<State>,
    epoch: Instant,
    /// Requests held back at least once.
    throttled: AtomicU64,
}

impl Default for Limiter {
    fn default() -> Self {
        Limiter::new(IoLimits::default())
    }
}

impl Limiter {
    /// A limiter enforcing `limits`.
    pub fn new(limits: IoLimits) -> Limiter {
        let l = Limiter {
            on: AtomicBool::new(false),
            state: Mutex::new(State::default()),
            epoch: Instant::now(),
            throttled: AtomicU64::new(0),
        };
        l.set(limits);
        l
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The limiter's clock: nanoseconds since it was made.
    pub fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Whether anything is limited (the ring thread's one check per request).
    #[inline]
    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// The limits in force.
    pub fn limits(&self) -> IoLimits {
        self.lock().limits
    }

    /// Requests held back by a limit so far.
    pub fn throttled(&self) -> u64 {
        self.throttled.load(Ordering::Relaxed)
    }

    /// Puts `limits` in force now. A bucket whose rate is unchanged keeps its level; a new
    /// or changed one starts full.
    pub fn set(&self, limits: IoLimits) {
        self.set_at(limits, self.now());
    }

    /// [`set`](Self::set) at time `now` of the limiter's clock.
    pub fn set_at(&self, limits: IoLimits, now: u64) {
        let mut st = self.lock();
        let keep = |b: &mut Option<Bucket>, r: Option<Rate>| match (b.as_mut(), r) {
            (Some(b), Some(r)) if b.rate == r => {}
            (_, Some(r)) => *b = Some(Bucket::new(r, now)),
            (_, None) => *b = None,
        };
        keep(&mut st.buckets.read_iops, limits.read_iops);
        keep(&mut st.buckets.write_iops, limits.write_iops);
        keep(&mut st.buckets.read_bps, limits.read_bps);
        keep(&mut st.buckets.write_bps, limits.write_bps);
        st.limits = limits;
        self.on.store(!limits.is_unlimited(), Ordering::Relaxed);
    }

    /// Lets one `dir` request start now, taking its IOPS token, or says how long to wait.
    pub fn admit(&self, dir: Dir) -> Result<(), Duration> {
        self.admit_at(dir, self.now()).map_err(Duration::from_nanos)
    }

    /// [`admit`](Self::admit) at time `now`; the wait in nanoseconds.
    pub fn admit_at(&self, dir: Dir, now: u64) -> Result<(), u64> {
        let mut st = self.lock();
        let (iops, bytes) = st.buckets.of(dir);
        let mut wait = 0;
        if let Some(b) = iops.as_mut() {
            b.refill(now);
            wait = wait.max(b.wait_for(1.0));
        }
        if let Some(b) = bytes.as_mut() {
            b.refill(now);
            wait = wait.max(b.wait_for(0.0));
        }
        if wait > 0 {
            return Err(wait);
        }
        if let Some(b) = iops.as_mut() {
            b.level -= 1.0;
        }
        Ok(())
    }

    /// Charges an admitted request's bytes (known once its segments are read).
    pub fn charge(&self, dir: Dir, bytes: u64) {
        self.charge_at(dir, bytes, self.now());
    }

    /// [`charge`](Self::charge) at time `now`.
    pub fn charge_at(&self, dir: Dir, bytes: u64, now: u64) {
        let mut st = self.lock();
        if let (_, Some(b)) = st.buckets.of(dir) {
            b.refill(now);
            b.level -= bytes as f64;
        }
    }

    /// Counts a request held back (once per request).
    pub fn count_throttled(&self) {
        self.throttled.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    /// A guest that always has a request ready: each is admitted as soon as the limiter
    /// allows, on the fake clock, for `seconds`. Returns requests and bytes served.
    fn run(l: &Limiter, dir: Dir, bytes: u64, start: u64, seconds: u64) -> (u64, u64) {
        let (mut now, end) = (start, start + seconds * S);
        let (mut n, mut b) = (0, 0);
        while now < end {
            match l.admit_at(dir, now) {
                Ok(()) => {
                    l.charge_at(dir, bytes, now);
                    n += 1;
                    b += bytes;
                }
                Err(wait) => now += wait,
            }
        }
        (n, b)
    }

    /// A limiter whose buckets start at time 0 of the fake clock.
    fn limiter(words: &[&str]) -> Limiter {
        let l = Limiter::default();
        l.set_at(limits(words), 0);
        l
    }

    fn limits(words: &[&str]) -> IoLimits {
        let mut l = IoLimits::default();
        l.set_words(words.iter().copied()).unwrap();
        l
    }

    #[test]
    fn an_iops_limit_gives_rate_times_time_plus_the_burst() {
        for rate in [1u64, 100, 5000, 250_000] {
            let l = limiter(&[&format!("read-iops={rate}")]);
            let burst = (rate / 10).max(1);
            let (n, _) = run(&l, Dir::Read, 4096, 0, 10);
            let want = rate * 10 + burst;
            assert!(
                n.abs_diff(want) <= 1,
                "rate {rate}: {n} requests, want {want}"
            );
            // Writes are not limited by a read limit.
            assert_eq!(l.admit_at(Dir::Write, 10 * S), Ok(()));
        }
    }

    #[test]
    fn a_bandwidth_limit_holds_with_requests_of_any_size() {
        for (rate, bs) in [(1u64 << 20, 4096u64), (10 << 20, 1 << 20), (3 << 20, 45056)] {
            let l = limiter(&[&format!("write-bps={rate}")]);
            let (_, bytes) = run(&l, Dir::Write, bs, 0, 10);
            // At most one request of debt beyond rate × time + burst.
            let most = rate * 10 + rate / 10 + bs;
            assert!(
                bytes <= most && bytes + 2 * bs >= rate * 10,
                "{rate} {bs}: {bytes}"
            );
        }
    }

    #[test]
    fn a_burst_goes_at_once_then_the_rate_takes_over() {
        let l = limiter(&["read-iops=100", "read-iops-burst=30"]);
        for _ in 0..30 {
            assert_eq!(l.admit_at(Dir::Read, 0), Ok(()));
        }
        // The 31st waits one request's time: 10 ms.
        assert_eq!(l.admit_at(Dir::Read, 0), Err(S / 100));
        assert_eq!(l.admit_at(Dir::Read, S / 100), Ok(()));
        // A quiet second refills the burst, never more: the burst at once, then one every
        // 10 ms (the one due at the end of the second falls outside it).
        let (n, _) = run(&l, Dir::Read, 0, 2 * S, 1);
        assert_eq!(n, 30 + 99);
    }

    #[test]
    fn limits_change_live_and_lift() {
        let l = limiter(&["read-iops=1000"]);
        assert!(l.is_on());
        let (n, _) = run(&l, Dir::Read, 512, 0, 1);
        assert!(n.abs_diff(1100) <= 1, "{n}");
        l.set_at(limits(&["read-iops=10"]), S);
        let (n, _) = run(&l, Dir::Read, 512, S, 10);
        assert!(n.abs_diff(101) <= 1, "{n}");
        l.set_at(IoLimits::default(), 11 * S);
        assert!(!l.is_on());
        assert_eq!(l.limits(), IoLimits::default());
    }

    #[test]
    fn bad_words_name_the_key() {
        let mut l = IoLimits::default();
        for (w, want) in [
            ("read-iops=fast", "`read-iops` = fast: not a whole number"),
            ("read-bps=12Q", "`read-bps`"),
            ("read-iops-burst=5", "needs `read-iops` set first"),
            ("speed=5", "unknown limit `speed`"),
            ("read-iops", "expected key=value"),
        ] {
            let e = l.set_words([w]).unwrap_err();
            assert!(e.contains(want), "{w}: {e}");
        }
        l.set_words(["write-bps=20M", "write-bps-burst=1M", "read-iops=off"])
            .unwrap();
        assert_eq!(
            l.write_bps,
            Some(Rate {
                per_second: 20 << 20,
                burst: 1 << 20
            })
        );
        assert_eq!(l.describe(), "write-bps=20971520/s (burst 1048576)");
    }
}
