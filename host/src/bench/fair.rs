//! What the fair same-run references ([`super::rbd_fair`], [`super::nbd_fair`]) share: the
//! walk over the region (the ring bench's own), the fresh data stamped into every write
//! buffer, the figures, and a loaded system library's symbols.
//!
//! A fair reference is a small client of the engine's own library (librbd, libnbd) that keeps
//! the same number of requests in flight, of the same size, over the same region, for the same
//! time as the plugin, and hands the library new data on every write: unlike `rbd bench`,
//! which writes one prepared buffer again and again, it pays for whatever the library does
//! with fresh data (copies, checksums), as a disk serving a guest does.

use super::direct::Pattern;
use crate::histogram::Histogram;
use crate::rng::Rng;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// What a fair reference measured.
#[derive(Debug, Clone, Copy)]
pub struct FairFigures {
    /// Requests that completed with all their bytes.
    pub ops: u64,
    /// Bytes those requests moved (what the library reported, not what was asked).
    pub bytes: u64,
    /// Requests that failed.
    pub failed: u64,
    /// Seconds from the first submission to the last completion.
    pub seconds: f64,
    /// Operations per second.
    pub iops: f64,
    /// Megabytes (10^6) per second.
    pub mbps: f64,
    /// Median and 99th percentile latency, microseconds.
    pub lat_p50_us: f64,
    pub lat_p99_us: f64,
    /// CPU time per request; the client side is the submitting thread.
    pub cpu: Option<super::usage::CpuFigures>,
}

impl FairFigures {
    /// Figures from counts, the time taken and the latencies.
    pub fn new(ops: u64, bytes: u64, failed: u64, elapsed: Duration, h: &Histogram) -> Self {
        let s = elapsed.as_secs_f64().max(1e-9);
        FairFigures {
            ops,
            bytes,
            failed,
            seconds: s,
            iops: ops as f64 / s,
            mbps: bytes as f64 / s / 1e6,
            lat_p50_us: h.percentile(0.5) as f64 / 1000.0,
            lat_p99_us: h.percentile(0.99) as f64 / 1000.0,
            cpu: None,
        }
    }

    /// The JSON fields, each named `PREFIX_...`.
    pub fn json(&self, prefix: &str) -> String {
        format!(
            ",\"{prefix}_iops\":{:.0},\"{prefix}_mbps\":{:.1},\"{prefix}_ops\":{},\"{prefix}_bytes\":{},\"{prefix}_failed\":{},\"{prefix}_lat_p99_us\":{:.3}",
            self.iops, self.mbps, self.ops, self.bytes, self.failed, self.lat_p99_us
        ) + &self.cpu.map(|c| c.json(prefix)).unwrap_or_default()
    }

    /// The text lines: the figures, then the plugin's IOPS as a ratio of them.
    pub fn print(&self, label: &str, what: &str, plugin_iops: f64) {
        println!(
            "  {label}: {:>10.0} IOPS {:>10.1} MB/s  p50 {:.3} us  p99 {:.3} us  ({what}, same run)",
            self.iops, self.mbps, self.lat_p50_us, self.lat_p99_us
        );
        if let Some(c) = &self.cpu {
            println!("{}", c.line("the submitting thread"));
        }
        println!(
            "  ratio:  {:.3} of {label} (fair reference: fresh data on every write)",
            plugin_iops / self.iops.max(1e-9)
        );
    }
}

/// Completions handed from whichever thread the library (or plugin) completes on to the
/// submitting thread, which takes them in batches.
pub struct Completions<T> {
    done: Mutex<Vec<T>>,
    wake: Condvar,
}

impl<T> Default for Completions<T> {
    fn default() -> Self {
        Completions {
            done: Mutex::new(Vec::new()),
            wake: Condvar::new(),
        }
    }
}

impl<T> Completions<T> {
    /// Reports one completion.
    pub fn push(&self, item: T) {
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        done.push(item);
        self.wake.notify_one();
    }

    /// Waits for at least one completion and moves every reported one into the empty
    /// `batch`; false when none came within `stall` (None: waits for ever).
    pub fn take(&self, batch: &mut Vec<T>, stall: Option<Duration>) -> bool {
        let waited = Instant::now();
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        while done.is_empty() {
            done = match stall {
                None => self.wake.wait(done).unwrap_or_else(|e| e.into_inner()),
                Some(s) => {
                    let left = s.saturating_sub(waited.elapsed());
                    if left.is_zero() {
                        return false;
                    }
                    self.wake
                        .wait_timeout(done, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
        std::mem::swap(&mut *done, batch);
        true
    }
}

/// What a reference client counts while it runs: requests in flight, completions and the
/// bytes they moved, failures and the first one's reason, latencies.
#[derive(Default)]
pub struct Tally {
    /// Requests submitted and not yet completed.
    pub in_flight: usize,
    ops: u64,
    bytes: u64,
    failed: u64,
    first_error: Option<String>,
    hist: Histogram,
}

impl Tally {
    /// A submission's outcome: one more in flight, or a failure.
    pub fn submitted(&mut self, r: Result<(), String>) {
        match r {
            Ok(()) => self.in_flight += 1,
            Err(e) => self.failure(Some(e)),
        }
    }

    /// A request that completed and moved `bytes` after `latency`.
    pub fn succeeded(&mut self, bytes: u64, latency: Duration) {
        self.in_flight -= 1;
        self.ops += 1;
        self.bytes += bytes;
        self.hist.record(latency.as_nanos() as u64);
    }

    /// A request that completed in error (`why`, when the engine said).
    pub fn failed(&mut self, why: Option<String>) {
        self.in_flight -= 1;
        self.failure(why);
    }

    fn failure(&mut self, why: Option<String>) {
        self.failed += 1;
        if let Some(e) = why {
            self.first_error.get_or_insert(e);
        }
    }

    /// What the first failure said, if one did.
    pub fn first_error(&self) -> Option<String> {
        self.first_error.clone()
    }

    /// The figures over `elapsed`, or why there are none (nothing completed). `meter` was
    /// started with the run on this thread, the submitting one.
    pub fn figures(
        self,
        elapsed: Duration,
        meter: super::usage::Meter,
    ) -> Result<FairFigures, String> {
        let cpu = meter.stop_here(self.ops);
        if self.ops == 0 {
            return Err(format!(
                "no request completed ({} failed{})",
                self.failed,
                self.first_error
                    .map(|e| format!(", first: {e}"))
                    .unwrap_or_default()
            ));
        }
        Ok(FairFigures {
            cpu: Some(cpu),
            ..FairFigures::new(self.ops, self.bytes, self.failed, elapsed, &self.hist)
        })
    }
}

/// The offsets the ring bench's guest sends: sequential patterns keep their requests side by
/// side and wrap at the end of the region, random ones pick aligned blocks uniformly.
pub struct Walk {
    sequential: bool,
    bs: u64,
    blocks: u64,
    next: u64,
    rng: Rng,
}

impl Walk {
    /// A walk over the first `region` bytes in `bs` blocks (at least one block).
    pub fn new(pattern: Pattern, bs: usize, region: u64) -> Walk {
        Walk {
            sequential: matches!(pattern, Pattern::Read | Pattern::Write),
            bs: bs as u64,
            blocks: (region / bs as u64).max(1),
            next: 0,
            rng: Rng::new(7),
        }
    }

    /// The next request's offset.
    pub fn offset(&mut self) -> u64 {
        let block = if self.sequential {
            let b = self.next;
            self.next = (self.next + 1) % self.blocks;
            b
        } else {
            self.rng.below(self.blocks)
        };
        block * self.bs
    }
}

/// Makes `buf` new data for write number `seq`: every 512-byte sector gets the request's number
/// and its own index in its first 16 bytes, so no two writes carry the same bytes and a library
/// can keep nothing (a checksum, a buffer) from one write for the next. Costs a few stores per
/// sector, far less than any copy of the buffer.
pub fn refill(buf: &mut [u8], seq: u64) {
    for (i, sector) in buf.chunks_mut(512).enumerate() {
        let n = sector.len().min(8);
        sector[..n].copy_from_slice(&seq.to_le_bytes()[..n]);
        if sector.len() >= 16 {
            sector[8..16].copy_from_slice(&(i as u64).to_le_bytes());
        }
    }
}

/// Page-aligned, zeroed memory of `len` bytes, as a guest's pages are (and as librbd and
/// libnbd see them from the plugin), for one request in flight.
pub struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

// SAFETY: the buffer is plain memory owned by this value; whoever holds it may send it on.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// `len` (> 0) bytes aligned to 4096.
    pub fn new(len: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len.max(1), 4096).expect("buffer size");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, layout }
    }

    /// The start of the buffer, for the library.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// The buffer's bytes.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for layout.size() bytes, initialized (zeroed), owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// Loads a system library for the rest of the process, naming the Debian package on failure.
/// It is never unloaded: Ceph's libraries start threads and keep global state that must not
/// vanish under them, and a process that benchmarks once has no reason to unload anything.
pub fn load_library(name: &str, package: &str) -> Result<&'static libloading::Library, String> {
    // SAFETY: loading a system library runs its initializers; librbd, librados and libnbd are
    // the libraries the plugins themselves link with, made to be loaded into any process.
    let lib = unsafe { libloading::Library::new(name) }
        .map_err(|e| format!("{name}: {e} (install {package})"))?;
    Ok(Box::leak(Box::new(lib)))
}

/// A symbol of `lib` as a function pointer of type `T`.
///
/// # Safety
/// `T` must be the function's real C signature.
pub unsafe fn symbol<T: Copy>(lib: &'static libloading::Library, name: &str) -> Result<T, String> {
    // SAFETY: the caller's contract on T; the library is never unloaded.
    unsafe { lib.get::<T>(name.as_bytes()) }
        .map(|s| *s)
        .map_err(|e| format!("{name}: {e}"))
}

/// One fair reference's figures, as `bench` reports them.
pub struct Measured {
    /// Its label in the text report ("rbd-fair", "nbd-fair"), also the pairs' name for it.
    pub label: &'static str,
    /// What it is, for the text report.
    pub what: &'static str,
    /// Prefix of its JSON fields.
    pub prefix: &'static str,
    /// The figures.
    pub figures: FairFigures,
}

/// The fair references `bench` asked for: with `--rbd-bench` the librbd client on the
/// plugin's image, with `--fio-nbd [URI]` the libnbd client on the same server (the URI given,
/// else the plugin's `uri` key). Each runs `depth` requests of `bs` bytes in flight over
/// `region` bytes for `duration`, right after the plugin's own run (right before it with
/// `bench --fair-first`).
pub fn from_cli(
    rbd_bench: bool,
    fio_nbd: Option<&str>,
    config: &xen_disk_plugin_api::Config,
    (pattern, bs, depth, region, duration): (Pattern, usize, usize, u64, Duration),
    client_cpu: Option<usize>,
) -> anyhow::Result<Vec<Measured>> {
    let mut out = Vec::new();
    if rbd_bench {
        let figures =
            super::rbd_fair::run(config, pattern, bs, depth, region, duration, client_cpu)
                .map_err(|e| anyhow::anyhow!("--rbd-bench: the fair librbd reference: {e}"))?;
        out.push(Measured {
            label: "rbd-fair",
            what: "librbd aio, fresh data per write, same image",
            prefix: "rbd_fair",
            figures,
        });
    }
    if let Some(uri) = fio_nbd {
        let uri = match (uri, config.value("uri").and_then(|v| v.as_str())) {
            ("", Some(u)) => u.to_string(),
            ("", None) => anyhow::bail!("--fio-nbd: give a URI, or a plugin with a `uri` key"),
            (u, _) => u.to_string(),
        };
        let figures = super::nbd_fair::run(&uri, pattern, bs, depth, region, duration, client_cpu)
            .map_err(|e| anyhow::anyhow!("--fio-nbd {uri}: the fair libnbd reference: {e}"))?;
        out.push(Measured {
            label: "nbd-fair",
            what: "libnbd aio, one connection, fresh data per write, same server",
            prefix: "nbd_fair",
            figures,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::usage::Meter;
    use super::*;

    #[test]
    fn a_tally_counts_what_completed_and_names_the_first_failure() {
        let mut t = Tally::default();
        t.submitted(Ok(()));
        t.submitted(Ok(()));
        t.submitted(Err("refused".into()));
        assert_eq!(t.in_flight, 2);
        t.failed(Some("EIO".into()));
        assert_eq!(t.in_flight, 1);
        let none = std::mem::take(&mut t).figures(Duration::from_secs(1), Meter::start());
        assert_eq!(
            none.unwrap_err(),
            "no request completed (2 failed, first: refused)"
        );
        t.submitted(Ok(()));
        t.submitted(Ok(()));
        t.succeeded(4096, Duration::from_micros(50));
        t.succeeded(4096, Duration::from_micros(70));
        assert_eq!(t.in_flight, 0);
        let f = t.figures(Duration::from_secs(2), Meter::start()).unwrap();
        assert_eq!((f.ops, f.bytes, f.failed), (2, 8192, 0));
        assert!(f
            .cpu
            .is_some_and(|c| c.client_us >= 0.0 && c.guest_us.is_none()));
    }

    #[test]
    fn completions_come_in_batches_and_a_stall_gives_up() {
        let c = std::sync::Arc::new(Completions::<u32>::default());
        let mut batch = Vec::new();
        assert!(!c.take(&mut batch, Some(Duration::from_millis(20))));
        c.push(1);
        c.push(2);
        assert!(c.take(&mut batch, Some(Duration::from_millis(20))));
        assert_eq!(batch, [1, 2]);
        batch.clear();
        let from = c.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            from.push(3);
        });
        assert!(c.take(&mut batch, None));
        assert_eq!(batch, [3]);
        t.join().unwrap();
    }

    #[test]
    fn sequential_walks_wrap_and_random_ones_stay_in_the_region() {
        let mut w = Walk::new(Pattern::Write, 4096, 3 * 4096);
        let offs: Vec<u64> = (0..4).map(|_| w.offset()).collect();
        assert_eq!(offs, [0, 4096, 8192, 0]);
        let mut w = Walk::new(Pattern::Randread, 4096, 10 * 4096);
        for _ in 0..1000 {
            let o = w.offset();
            assert!(o < 10 * 4096 && o.is_multiple_of(4096));
        }
    }

    #[test]
    fn every_refill_is_new_data_in_every_sector() {
        let mut a = vec![0u8; 4096];
        refill(&mut a, 1);
        let b1 = a.clone();
        refill(&mut a, 2);
        for (s1, s2) in b1.chunks(512).zip(a.chunks(512)) {
            assert_ne!(s1, s2);
        }
        assert_ne!(&a[..512], &a[512..1024], "sectors differ from each other");
        let mut buf = AlignedBuf::new(8192);
        assert_eq!(buf.ptr() as usize % 4096, 0);
        refill(buf.as_mut_slice(), 3);
        assert_eq!(buf.as_mut_slice()[..8], 3u64.to_le_bytes());
    }
}
