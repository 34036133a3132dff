//! `bench --submit`: an asynchronous plugin driven the way a fair reference drives its
//! library. One thread keeps `iodepth` submissions in flight through the plugin's own
//! asynchronous entry point (the one the ring thread uses), with fresh data in every write,
//! the same walk over the region, and completions handed back to it as the references'
//! are. No ring, no grants and no simulated guest: beside `--rbd-bench` or `--fio-nbd` it
//! compares the plugin alone with a plain client of the same library, so what the ring path
//! adds (measured by the ring bench) is not mixed into it.

use super::direct::{Figures, Pattern};
use super::fair::{refill, AlignedBuf, Completions, Tally, Walk};
use crate::plugin::GuardedDisk;
use std::sync::Arc;
use std::time::{Duration, Instant};
use xen_disk_plugin_api::{RawBuf, SubmitOp};

/// Why a plugin with another thread model cannot be driven this way.
pub const NOT_ASYNC: &str =
    "only an asynchronous plugin (`ThreadModel::Async`) takes submissions; this one serves blocking calls";

/// How long the run waits for any completion before it gives up on the plugin.
const STALL: Duration = Duration::from_secs(60);

/// Runs `pattern` on `disk` with `depth` submissions of `bs` bytes in flight over the first
/// `region` bytes for `duration`; the submitting thread keeps to `client_cpu` if given.
pub fn run(
    disk: &GuardedDisk,
    pattern: Pattern,
    bs: usize,
    depth: usize,
    region: u64,
    duration: Duration,
    client_cpu: Option<usize>,
) -> Result<Figures, String> {
    if !disk.is_async() {
        return Err(NOT_ASYNC.into());
    }
    let region = region.min(disk.size());
    if region < bs as u64 {
        return Err(format!("block size {bs} is larger than the region"));
    }
    let writing = matches!(pattern, Pattern::Write | Pattern::Randwrite);
    if writing && disk.info().read_only {
        return Err("the disk is read-only".into());
    }
    let _pin = super::cpu::pin_here(client_cpu)?;
    if writing && disk.info().can_flush {
        // As the ring bench's guest and the references do: librbd's cache stays
        // write-through until the first flush.
        disk.flush()
            .map_err(|e| format!("the first flush failed: {e}"))?;
    }
    let depth = depth.max(1);
    // Slot and outcome, from whichever thread the plugin completes on.
    let completed = Arc::new(Completions::<(usize, Result<(), String>)>::default());
    let mut bufs: Vec<AlignedBuf> = (0..depth).map(|_| AlignedBuf::new(bs)).collect();
    let mut sent = vec![Instant::now(); depth];
    let mut walk = Walk::new(pattern, bs, region);
    let mut tally = Tally::default();
    let mut seq = 0u64;
    let op = if writing {
        SubmitOp::Write
    } else {
        SubmitOp::Read
    };
    let meter = super::usage::Meter::start();
    let started = Instant::now();
    let deadline = started + duration;
    let mut submit = |slot: usize, bufs: &mut [AlignedBuf], sent: &mut [Instant]| {
        let offset = walk.offset();
        if writing {
            seq += 1;
            refill(bufs[slot].as_mut_slice(), seq);
        }
        sent[slot] = Instant::now();
        let raw = vec![RawBuf {
            base: bufs[slot].ptr(),
            len: bs,
        }];
        let completed = completed.clone();
        // SAFETY: the slot's buffer lives in `bufs` until this function returns, which is
        // after every submission has completed (the loop below drains them all), and this
        // thread leaves it alone until its completion is reported.
        unsafe {
            disk.submit(op, offset, raw, move |r| {
                completed.push((slot, r.map_err(|e| e.to_string())))
            })
        };
    };
    for slot in 0..depth {
        submit(slot, &mut bufs, &mut sent);
        tally.submitted(Ok(()));
    }
    let mut batch = Vec::with_capacity(depth);
    while tally.in_flight > 0 {
        if !completed.take(&mut batch, Some(STALL)) {
            // The plugin still holds the buffers of what it never completed: they stay
            // allocated (leaked), so a late completion writes into live memory.
            std::mem::forget(bufs);
            return Err(format!(
                "{} submissions not completed after {} s",
                tally.in_flight,
                STALL.as_secs()
            ));
        }
        let now = Instant::now();
        for (slot, r) in batch.drain(..) {
            match r {
                Ok(()) => tally.succeeded(bs as u64, now.duration_since(sent[slot])),
                Err(e) => tally.failed(Some(e)),
            }
            if now < deadline {
                submit(slot, &mut bufs, &mut sent);
                tally.submitted(Ok(()));
            }
        }
    }
    let elapsed = started.elapsed();
    let first_error = tally.first_error();
    let f = tally.figures(elapsed, meter)?;
    Ok(Figures {
        ops: f.ops,
        failed: f.failed,
        first_error,
        seconds: f.seconds,
        iops: f.iops,
        mbps: f.mbps,
        ns_per_op: f.seconds * 1e9 / f.ops.max(1) as f64,
        lat_p50_us: f.lat_p50_us,
        lat_p99_us: f.lat_p99_us,
        ring: None,
        cpu: f.cpu,
    })
}
