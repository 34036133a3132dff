//! A ring's counters, readable while it runs (`ctl stats`, the bench): what was served,
//! how it ended, how long it took. Written with relaxed atomics by whichever thread answers.

use super::io::IoOp;
use crate::blkif::abi::Status;
use crate::histogram::AtomicHistogram;
use std::sync::atomic::{AtomicU64, Ordering};

/// Devices connected to a guest since the process started (each connection counts).
pub static ATTACHES: AtomicU64 = AtomicU64::new(0);
/// Connections that ended (the guest closed, a detach, a broken ring).
pub static DETACHES: AtomicU64 = AtomicU64::new(0);
use std::time::Duration;

/// Counters, readable while the queue runs (`ctl stats`).
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Requests answered OKAY.
    pub ok: AtomicU64,
    /// Requests answered ERROR.
    pub errors: AtomicU64,
    /// Requests answered EOPNOTSUPP.
    pub unsupported: AtomicU64,
    /// Reads served (answered, whatever the status).
    pub reads: AtomicU64,
    /// Writes served.
    pub writes: AtomicU64,
    /// Flushes and barriers served.
    pub flushes: AtomicU64,
    /// Discards served.
    pub discards: AtomicU64,
    /// Bytes read by successful reads.
    pub read_bytes: AtomicU64,
    /// Bytes written by successful writes.
    pub write_bytes: AtomicU64,
    /// Requests handed to the plugin and not yet answered.
    pub in_flight: AtomicU64,
    /// Requests an asynchronous plugin's completing thread answered itself (see
    /// [`super::queue::QueueParts::answer_on_completion`]).
    pub answered_on_completion: AtomicU64,
    /// Time from taking a request off the ring to answering it, of the requests timed (all
    /// of them unless the clock is a system call: see `queue::clock`).
    pub latency: AtomicHistogram,
    /// Requests taken off the ring and not yet answered, including one held back by a
    /// limit or a barrier: set by the ring thread once per batch it takes.
    pub depth: AtomicU64,
    /// Times the ring thread slept waiting for the guest or a completion (each one costs a
    /// wake-up: requests / sleeps is the batch a wake-up serves).
    pub sleeps: AtomicU64,
    /// Event-channel notifications sent to the guest (one per batch of responses at most).
    pub notifies: AtomicU64,
    /// Requests handed to a worker thread (two thread wake-ups each: there and back).
    pub handoffs: AtomicU64,
    /// Times the ring stayed idle long enough to give its thread up (see
    /// [`super::queue::QueueParts::park_after`]); each later request that found it parked
    /// cost a thread start.
    pub parks: AtomicU64,
}

impl QueueStats {
    pub(crate) fn count(&self, status: Status) {
        let c = match status {
            Status::Okay => &self.ok,
            Status::NotSupported => &self.unsupported,
            Status::Error => &self.errors,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request the plugin served: its kind, its bytes if it succeeded, its latency
    /// if it was one timed (see `queue::clock`).
    pub(crate) fn served(&self, op: IoOp, bytes: u64, status: Status, latency: Option<Duration>) {
        self.count(status);
        let ok = status == Status::Okay;
        let (n, b) = match op {
            IoOp::Read => (&self.reads, Some(&self.read_bytes)),
            IoOp::Write => (&self.writes, Some(&self.write_bytes)),
            IoOp::Flush | IoOp::Barrier if bytes > 0 => (&self.writes, Some(&self.write_bytes)),
            IoOp::Flush | IoOp::Barrier => (&self.flushes, None),
            IoOp::Discard { .. } => (&self.discards, None),
        };
        n.fetch_add(1, Ordering::Relaxed);
        if let (Some(b), true) = (b, ok) {
            b.fetch_add(bytes, Ordering::Relaxed);
        }
        if let Some(l) = latency {
            self.latency.record(l.as_nanos() as u64);
        }
    }
}
