//! Driving a disk straight through the plugin boundary, and the memcpy reference.
//!
//! Sequential modes walk the region in `bs` steps and wrap; random modes pick aligned offsets
//! uniformly. Read modes first read the region once untimed, so page-cache and mapping faults
//! are not what is measured. A failed request is counted and the run goes on: the figures are
//! those of the requests that succeeded, beside the number that failed.

use crate::histogram::Histogram;
use crate::plugin::GuardedDisk;
use crate::rng::Rng;
use std::time::{Duration, Instant};
use xen_disk_plugin_api::{with_read_bufs, with_write_bufs};

/// The access pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Pattern {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct DirectOptions {
    /// Access pattern.
    pub pattern: Pattern,
    /// Block size in bytes.
    pub bs: usize,
    /// Bytes of the disk used, from offset 0.
    pub region: u64,
    /// How long to run.
    pub duration: Duration,
    /// Threads issuing I/O at once.
    pub threads: usize,
    /// Stop after one pass over the region (each thread its share) even before `duration`:
    /// the run a count-based reference (qemu-img bench) repeats.
    pub one_pass: bool,
}

/// Figures from one run.
#[derive(Debug, Clone)]
pub struct Figures {
    /// Operations completed successfully.
    pub ops: u64,
    /// Operations that failed (not in `ops` nor in the latencies).
    pub failed: u64,
    /// What the first failure said.
    pub first_error: Option<String>,
    /// Seconds measured.
    pub seconds: f64,
    /// Operations per second.
    pub iops: f64,
    /// Megabytes (10^6) per second.
    pub mbps: f64,
    /// Mean nanoseconds per operation per thread.
    pub ns_per_op: f64,
    /// Median latency, microseconds.
    pub lat_p50_us: f64,
    /// 99th percentile latency, microseconds.
    pub lat_p99_us: f64,
    /// The ring path's wake-ups per request (none for `--direct`).
    pub ring: Option<RingCounts>,
    /// CPU time per request (ring runs).
    pub cpu: Option<super::usage::CpuFigures>,
}

/// How often, per request answered, the ring path's threads woke one another: what a
/// request costs beyond the plugin's own work (each wake-up is a context switch, and on a
/// virtual machine an interrupt between CPUs).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RingCounts {
    /// The ring thread went to sleep (and was woken again by the guest or a completion).
    pub sleeps: f64,
    /// The backend notified the guest's event channel.
    pub notifies: f64,
    /// Share of the requests an asynchronous plugin's completing thread answered itself.
    pub answered_on_completion: f64,
    /// Requests handed to a worker thread.
    pub handoffs: f64,
    /// Median latency as the ring sees it (from the pass that took a request to the pass
    /// that answered it), microseconds: the plugin's time plus the ring thread's queueing,
    /// without the wake-ups between the guest and the ring thread.
    pub ring_p50_us: f64,
}

impl RingCounts {
    /// The counts of every queue, per request answered.
    pub fn of(queues: &[std::sync::Arc<crate::backend::stats::QueueStats>]) -> RingCounts {
        use std::sync::atomic::Ordering::Relaxed;
        let sum = |f: fn(&crate::backend::stats::QueueStats) -> u64| -> f64 {
            queues.iter().map(|q| f(q)).sum::<u64>() as f64
        };
        let answered =
            sum(|q| q.ok.load(Relaxed) + q.errors.load(Relaxed) + q.unsupported.load(Relaxed))
                .max(1.0);
        RingCounts {
            sleeps: sum(|q| q.sleeps.load(Relaxed)) / answered,
            notifies: sum(|q| q.notifies.load(Relaxed)) / answered,
            answered_on_completion: sum(|q| q.answered_on_completion.load(Relaxed)) / answered,
            handoffs: sum(|q| q.handoffs.load(Relaxed)) / answered,
            ring_p50_us: {
                let mut h = crate::histogram::Histogram::default();
                for q in queues {
                    h.merge(&q.latency.snapshot());
                }
                h.percentile(0.5) as f64 / 1000.0
            },
        }
    }

    /// The JSON fields.
    pub fn json(&self) -> String {
        format!(
            ",\"ring_sleeps_per_op\":{:.4},\"ring_notifies_per_op\":{:.4},\"ring_answered_on_completion\":{:.4},\"ring_handoffs_per_op\":{:.4},\"ring_lat_p50_us\":{:.3}",
            self.sleeps, self.notifies, self.answered_on_completion, self.handoffs, self.ring_p50_us
        )
    }

    /// The text line.
    pub fn line(&self) -> String {
        format!(
            "  ring:   per request {:.3} ring-thread sleeps, {:.3} guest notifications, {:.3} worker hand-offs; {:.0}% answered on the completing thread; p50 {:.3} us taken to answered",
            self.sleeps,
            self.notifies,
            self.handoffs,
            100.0 * self.answered_on_completion,
            self.ring_p50_us
        )
    }
}

fn figures(
    ops: u64,
    bytes_per_op: usize,
    elapsed: Duration,
    threads: usize,
    h: &Histogram,
) -> Figures {
    let s = elapsed.as_secs_f64().max(1e-9);
    Figures {
        ops,
        failed: 0,
        first_error: None,
        seconds: s,
        iops: ops as f64 / s,
        mbps: ops as f64 * bytes_per_op as f64 / s / 1e6,
        ns_per_op: s * 1e9 * threads as f64 / ops.max(1) as f64,
        lat_p50_us: h.percentile(0.5) as f64 / 1000.0,
        lat_p99_us: h.percentile(0.99) as f64 / 1000.0,
        ring: None,
        cpu: None,
    }
}

/// Runs the pattern against `disk`.
pub fn run(disk: &GuardedDisk, opts: &DirectOptions) -> Result<Figures, String> {
    let bs = opts.bs as u64;
    let region = opts.region.min(disk.size()) / bs * bs;
    if region == 0 {
        return Err(format!("block size {bs} is larger than the region"));
    }
    let reading = matches!(opts.pattern, Pattern::Read | Pattern::Randread);
    if !reading && disk.info().read_only {
        return Err("the disk is read-only".into());
    }
    if reading {
        // Warming only: a block that fails here fails (and is counted) in the timed run.
        let mut buf = vec![0u8; opts.bs];
        let mut off = 0;
        while off < region {
            let _ = with_read_bufs(&mut [&mut buf], |b| disk.read(off, b));
            off += bs;
        }
    }
    let started = Instant::now();
    type Run = (u64, Histogram, u64, Option<String>);
    let results: Vec<Result<Run, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..opts.threads.max(1))
            .map(|t| {
                scope.spawn(move || {
                    let mut buf = vec![0x5Au8; opts.bs];
                    let mut rng = Rng::new(t as u64 + 1);
                    let mut h = Histogram::default();
                    let blocks = region / bs;
                    let mut seq = (t as u64 * blocks / opts.threads.max(1) as u64) * bs;
                    let (mut ops, mut failed, mut first_error) = (0u64, 0u64, None);
                    let deadline = started + opts.duration;
                    let share = (blocks / opts.threads.max(1) as u64).max(1);
                    loop {
                        // Check the clock once per 64 ops; per-op timing is below.
                        if (ops + failed).is_multiple_of(64) && Instant::now() >= deadline {
                            break;
                        }
                        if opts.one_pass && ops + failed == share {
                            break;
                        }
                        let off = match opts.pattern {
                            Pattern::Read | Pattern::Write => {
                                let o = seq;
                                seq = if seq + bs >= region { 0 } else { seq + bs };
                                o
                            }
                            Pattern::Randread | Pattern::Randwrite => rng.below(blocks) * bs,
                        };
                        let t0 = Instant::now();
                        let r = if reading {
                            with_read_bufs(&mut [&mut buf], |b| disk.read(off, b))
                        } else {
                            with_write_bufs(&[&buf], |b| disk.write(off, b, false))
                        };
                        let took = t0.elapsed().as_nanos() as u64;
                        match r {
                            Ok(()) => {
                                h.record(took);
                                ops += 1;
                            }
                            Err(e) => {
                                failed += 1;
                                first_error.get_or_insert_with(|| e.to_string());
                            }
                        }
                    }
                    Ok((ops, h, failed, first_error))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("bench thread panicked".into()))
            })
            .collect()
    });
    let elapsed = started.elapsed();
    let (mut total, mut failed, mut first_error) = (0, 0, None);
    let mut hist = Histogram::default();
    for r in results {
        let (ops, h, f, e) = r?;
        total += ops;
        hist.merge(&h);
        failed += f;
        first_error = first_error.or(e);
    }
    Ok(Figures {
        failed,
        first_error,
        ..figures(total, opts.bs, elapsed, opts.threads.max(1), &hist)
    })
}

/// What `--against` measured: the other plugin's stack and its figures.
pub struct Against {
    /// "cnull (C)" style: the stack, and which SDK its top plugin was built with.
    pub name: String,
    /// Its figures under the same options.
    pub figures: Figures,
}

/// Opens `spec` with its defaults and runs the same direct pattern on it: the other side of
/// a comparison, e.g. a C plugin next to its Rust twin (`bench --direct discard --against
/// cnull`), through the same guard and the same loop.
pub fn run_against(spec: &str, opts: &DirectOptions) -> Result<Against, String> {
    let stack = crate::plugin::open_stack(spec, &xen_disk_plugin_api::Config::new())
        .map_err(|e| e.to_string())?;
    let sdk = if stack.layers[0].is_c() { "C" } else { "Rust" };
    let name = format!("{} ({sdk})", stack.describe());
    let disk = GuardedDisk::new(Box::new(stack.disk), false).map_err(|e| e.to_string())?;
    let figures = run(&disk, opts)?;
    if figures.failed > 0 {
        return Err(format!(
            "{name}: {} requests failed (first: {})",
            figures.failed,
            figures.first_error.as_deref().unwrap_or("no message")
        ));
    }
    Ok(Against { name, figures })
}

/// The `--against` lines of the text report.
pub fn print_against(a: &Against, mine: &Figures) {
    let g = &a.figures;
    println!(
        "  against {}: {:>12.0} IOPS {:>10.1} MB/s {:>9.1} ns/op  p50 {:.3} us  p99 {:.3} us",
        a.name, g.iops, g.mbps, g.ns_per_op, g.lat_p50_us, g.lat_p99_us
    );
    println!(
        "  difference: {:+.1} ns per call ({} minus the plugin above)",
        g.ns_per_op - mine.ns_per_op,
        a.name
    );
}

/// The `--against` fields of the JSON report.
pub fn against_json(a: &Against) -> String {
    format!(
        ",\"against\":\"{}\",\"against_iops\":{:.0},\"against_ns_per_op\":{:.1}",
        a.name.replace('"', "'"),
        a.figures.iops,
        a.figures.ns_per_op
    )
}

/// The reference: `memcpy` of `bs`-byte blocks walking a `region`-byte buffer into
/// destinations rotating through `dst_span` bytes, same threads and duration. What a perfect
/// zero-overhead read path would do. The ring path writes into `iodepth` different guest
/// buffers, so its reference rotates through as many: one reused buffer would stay in cache
/// and flatter memcpy.
pub fn memcpy_reference(
    bs: usize,
    region: u64,
    dst_span: usize,
    duration: Duration,
    threads: usize,
) -> Figures {
    let region = (region as usize).clamp(bs, 256 << 20) / bs * bs;
    let dst_span = dst_span.clamp(bs, 256 << 20) / bs * bs;
    let src = vec![0x33u8; region];
    let started = Instant::now();
    let per_thread: Vec<(u64, Histogram)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads.max(1))
            .map(|_| {
                let src = &src;
                scope.spawn(move || {
                    let mut dst = vec![0u8; dst_span];
                    let mut at = 0usize;
                    let mut h = Histogram::default();
                    let (mut ops, mut off) = (0u64, 0usize);
                    let deadline = started + duration;
                    loop {
                        if ops % 64 == 0 && Instant::now() >= deadline {
                            break;
                        }
                        let t0 = Instant::now();
                        dst[at..at + bs].copy_from_slice(&src[off..off + bs]);
                        std::hint::black_box(&mut dst);
                        at = if at + 2 * bs > dst_span { 0 } else { at + bs };
                        h.record(t0.elapsed().as_nanos() as u64);
                        off = if off + 2 * bs > region { 0 } else { off + bs };
                        ops += 1;
                    }
                    (ops, h)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let elapsed = started.elapsed();
    let mut hist = Histogram::default();
    let mut total = 0;
    for (ops, h) in &per_thread {
        total += ops;
        hist.merge(h);
    }
    figures(total, bs, elapsed, threads.max(1), &hist)
}
