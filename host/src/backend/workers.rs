//! A device's worker threads: blocking plugin calls happen here, so a slow request never
//! stalls the ring thread, and requests complete in any order.
//!
//! ```text
//!  ring thread ──(ring, slot)──▶ submit channel ──▶ worker: io::execute ──▶ done[ring] ─▶ wake
//! ```
//!
//! Each ring gives its slot table, a completion channel and a [`Wake`]; a worker that
//! completes a slot sends its index back on that ring's channel and wakes the ring thread,
//! which pushes the response. Only slot indices travel: nothing is allocated per request.
//! Workers start when work comes and none is free, and exit after [`IDLE_EXIT`] without
//! work: a dom0 with hundreds of mostly idle disks holds workers for the busy ones only.

use super::inflight::SlotTable;
use super::io::{execute, status_of};
use crate::plugin::GuardedDisk;
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How a worker wakes a ring thread that may be asleep.
pub trait Wake: Send + Sync {
    /// Makes the ring thread look at its completions soon.
    fn wake(&self);
}

/// What a worker needs from one ring.
pub struct RingShare<M> {
    /// The ring's slots.
    pub slots: Arc<SlotTable<M>>,
    /// Completed slot indices, back to the ring thread.
    pub done: Sender<u16>,
    /// Wakes the ring thread.
    pub wake: Arc<dyn Wake>,
}

/// The pool: up to `max` threads, started when work comes and none is free, gone after
/// [`IDLE_EXIT`] without work, so an idle disk holds no worker thread.
pub struct Workers {
    submit: Option<Sender<(u8, u16)>>,
    done: Vec<Sender<u16>>,
    lazy: Arc<Lazy>,
}

/// How long a worker waits for work before it exits.
pub const IDLE_EXIT: Duration = Duration::from_secs(5);

/// What starting workers on demand needs.
struct Lazy {
    max: usize,
    idle_exit: Duration,
    jobs: Receiver<(u8, u16)>,
    /// Workers alive, and those waiting for work.
    live: AtomicUsize,
    idle: AtomicUsize,
    spawned: AtomicUsize,
    threads: Mutex<Vec<JoinHandle<()>>>,
    run: Arc<dyn Fn(u8, u16) + Send + Sync>,
}

impl Lazy {
    /// Starts a worker if work waits and no worker is free (and the pool is not full).
    fn maybe_spawn(self: &Arc<Self>) {
        if self.idle.load(Ordering::SeqCst) > 0 {
            return;
        }
        let live = self.live.load(Ordering::SeqCst);
        if live >= self.max
            || self
                .live
                .compare_exchange(live, live + 1, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
        {
            return;
        }
        let me = self.clone();
        let i = self.spawned.fetch_add(1, Ordering::Relaxed);
        match std::thread::Builder::new()
            .name(format!("xen-disk-io-{i}"))
            .spawn(move || me.work())
        {
            Ok(t) => {
                let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
                threads.retain(|t| !t.is_finished());
                threads.push(t);
            }
            Err(e) => {
                self.live.fetch_sub(1, Ordering::SeqCst);
                tracing::warn!("no I/O worker thread: {e}");
            }
        }
    }

    fn work(&self) {
        loop {
            self.idle.fetch_add(1, Ordering::SeqCst);
            let job = self.jobs.recv_timeout(self.idle_exit);
            self.idle.fetch_sub(1, Ordering::SeqCst);
            match job {
                Ok((ring, index)) => (self.run)(ring, index),
                Err(RecvTimeoutError::Timeout) => {
                    self.live.fetch_sub(1, Ordering::SeqCst);
                    // Work sent after the wait ended, by a submitter that saw this worker
                    // idle and started none: stay for it.
                    if self.jobs.is_empty() {
                        return;
                    }
                    self.live.fetch_add(1, Ordering::SeqCst);
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.live.fetch_sub(1, Ordering::SeqCst);
                    return;
                }
            }
        }
    }
}

/// A ring's end of the pool: where its completions arrive.
pub type Completions = Receiver<u16>;

/// What a ring brings to the pool: its slots and how to wake its thread.
pub type RingParts<M> = (Arc<SlotTable<M>>, Arc<dyn Wake>);

impl Workers {
    /// A pool of up to `threads` workers serving `rings` on `disk` (none start before work
    /// comes). Returns the pool and, per ring, the receiver of its completions.
    pub fn start<M: Send + 'static>(
        threads: usize,
        disk: Arc<GuardedDisk>,
        rings: Vec<RingParts<M>>,
    ) -> (Workers, Vec<Completions>) {
        Workers::start_idle(threads, disk, rings, IDLE_EXIT)
    }

    /// [`Workers::start`] with workers that exit after `idle_exit` without work.
    pub fn start_idle<M: Send + 'static>(
        threads: usize,
        disk: Arc<GuardedDisk>,
        rings: Vec<RingParts<M>>,
        idle_exit: Duration,
    ) -> (Workers, Vec<Completions>) {
        let capacity: usize = rings.iter().map(|(t, _)| t.len()).sum::<usize>().max(1);
        let (submit, jobs) = bounded::<(u8, u16)>(capacity);
        let mut shares = Vec::new();
        let mut receivers = Vec::new();
        for (slots, wake) in rings {
            // Never blocks: a ring has at most its slot count in flight.
            let (done, completions) = bounded(slots.len().max(1));
            shares.push(RingShare { slots, done, wake });
            receivers.push(completions);
        }
        let done: Vec<Sender<u16>> = shares.iter().map(|s| s.done.clone()).collect();
        let run = move |ring: u8, index: u16| {
            let share = &shares[usize::from(ring)];
            // SAFETY: the ring thread gave this index away through the channel and does not
            // touch the slot until it comes back on `done`.
            let slot = unsafe { share.slots.slot(index) };
            // SAFETY: the slot's buffers point into its own live mappings.
            let result = unsafe { execute(&disk, slot.op, slot.offset, &slot.bufs) };
            if let Err(e) = &result {
                tracing::debug!(id = slot.id, offset = slot.offset, "request failed: {e}");
            }
            slot.status = status_of(&result);
            // Only the ring thread drops the receiver, after the workers stop.
            let _ = share.done.send(index);
            share.wake.wake();
        };
        let lazy = Arc::new(Lazy {
            max: threads,
            idle_exit,
            jobs,
            live: AtomicUsize::new(0),
            idle: AtomicUsize::new(0),
            spawned: AtomicUsize::new(0),
            threads: Mutex::new(Vec::new()),
            run: Arc::new(run),
        });
        (
            Workers {
                submit: Some(submit),
                done,
                lazy,
            },
            receivers,
        )
    }

    /// Where ring `ring`'s completions go: for requests completed elsewhere than on a worker
    /// (an asynchronous plugin's own threads).
    pub fn completions_sender(&self, ring: usize) -> Sender<u16> {
        self.done[ring].clone()
    }

    /// Hands slot `index` of ring `ring` to a worker. The caller gives up the slot until it
    /// comes back on that ring's completions.
    pub fn submit(&self, ring: u8, index: u16) {
        if let Some(s) = &self.submit {
            // The channel holds every slot of every ring, so this never waits.
            let _ = s.send((ring, index));
            self.lazy.maybe_spawn();
        }
    }

    /// Worker threads alive now.
    pub fn live(&self) -> usize {
        self.lazy.live.load(Ordering::SeqCst)
    }
}

impl Drop for Workers {
    /// Stops taking work; workers finish what they have, then exit.
    fn drop(&mut self) {
        self.submit = None;
        let threads =
            std::mem::take(&mut *self.lazy.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::inflight::FreeList;
    use super::super::io::IoOp;
    use super::*;
    use crate::blkif::abi::Status;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};
    use xen_disk_plugin_api::{Disk, DiskInfo, RawBuf, ReadBufs, Result, WriteBufs};

    /// Reads at offset 0 take a second; everything else is instant.
    struct Slow;
    impl Disk for Slow {
        fn info(&self) -> DiskInfo {
            DiskInfo::new(1 << 20)
        }
        fn read(&self, offset: u64, bufs: &mut ReadBufs<'_>) -> Result<()> {
            if offset == 0 {
                std::thread::sleep(Duration::from_secs(1));
            }
            bufs.fill(offset as u8);
            Ok(())
        }
        fn write(&self, _: u64, _: &WriteBufs<'_>) -> Result<()> {
            Ok(())
        }
    }

    #[derive(Default)]
    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_slow_request_does_not_hold_up_the_others() {
        let disk = Arc::new(GuardedDisk::new(Box::new(Slow), false).unwrap());
        let table = Arc::new(SlotTable::<Vec<u8>>::new(8, 1));
        let wake = Arc::new(Count::default());
        let (workers, done) = Workers::start(
            2,
            disk,
            vec![(table.clone(), wake.clone() as Arc<dyn Wake>)],
        );
        let mut free = FreeList::new(8);
        let started = Instant::now();
        for i in 0..8u64 {
            let index = free.take().unwrap();
            // SAFETY: the index was just taken from the free list: this thread owns it.
            let slot = unsafe { table.slot(index) };
            let mut page = vec![0xEEu8; 512];
            slot.bufs.clear();
            slot.bufs.push(RawBuf::from_mut(&mut page));
            (slot.id, slot.op, slot.offset, slot.mappings) = (i, IoOp::Read, i * 512, Some(page));
            workers.submit(0, index);
        }
        let mut order = Vec::new();
        for _ in 0..8 {
            let index = done[0].recv_timeout(Duration::from_secs(30)).unwrap();
            // SAFETY: the worker handed the index back: this thread owns it again.
            let slot = unsafe { table.slot(index) };
            assert_eq!(slot.status, Status::Okay);
            assert_eq!(
                slot.mappings.as_ref().unwrap()[0],
                (slot.offset as u8),
                "data of request {}",
                slot.id
            );
            order.push(slot.id);
            free.give(index);
        }
        // The slow request (id 0) completes last, the others long before it: the other
        // worker has its whole second for seven instant ones, however busy the machine.
        assert_eq!(*order.last().unwrap(), 0, "{order:?}");
        // About one slow read in all, with room for a loaded machine.
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(free.in_use(8), 0);
        // A worker wakes the ring just after handing a slot back: join them before counting.
        drop(workers);
        assert!(wake.0.load(Ordering::SeqCst) >= 8);
    }

    /// No worker before work, at most `threads` during it, none once idle, and a new one
    /// when work comes again. Idle for a second, a worker goes: a shorter time let them go
    /// before a loaded machine's test thread looked (100 ms is one time slice there).
    #[test]
    fn workers_come_with_work_and_go_when_idle() {
        let disk = Arc::new(GuardedDisk::new(Box::new(Slow), false).unwrap());
        let table = Arc::new(SlotTable::<()>::new(16, 0));
        let wake = Arc::new(Count::default());
        let (workers, done) = Workers::start_idle(
            3,
            disk,
            vec![(table.clone(), wake as Arc<dyn Wake>)],
            Duration::from_secs(1),
        );
        assert_eq!(workers.live(), 0);
        let mut free = FreeList::new(16);
        for round in 0..2 {
            for i in 0..16u64 {
                let index = free.take().unwrap();
                // SAFETY: taken from the free list, so owned here.
                let slot = unsafe { table.slot(index) };
                (slot.id, slot.op, slot.offset) = (i, IoOp::Write, 512);
                slot.bufs.clear();
                workers.submit(0, index);
                assert!(
                    workers.live() <= 3,
                    "round {round}: {} workers",
                    workers.live()
                );
            }
            for _ in 0..16 {
                let index = done[0].recv_timeout(Duration::from_secs(30)).unwrap();
                free.give(index);
            }
            assert!(workers.live() >= 1);
            let idle = Instant::now();
            while workers.live() > 0 {
                assert!(idle.elapsed() < Duration::from_secs(30), "workers stay");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    #[test]
    fn many_requests_complete_exactly_once() {
        let disk = Arc::new(GuardedDisk::new(Box::new(Slow), false).unwrap());
        let tables: Vec<_> = (0..2)
            .map(|_| Arc::new(SlotTable::<()>::new(32, 0)))
            .collect();
        let rings = tables
            .iter()
            .map(|t| (t.clone(), Arc::new(Count::default()) as Arc<dyn Wake>))
            .collect();
        let (workers, done) = Workers::start(3, disk, rings);
        let mut seen = vec![0u32; 2 * 20_000];
        for ring in 0..2u8 {
            let mut free = FreeList::new(32);
            let table = &tables[usize::from(ring)];
            let (mut sent, mut got) = (0u64, 0u64);
            while got < 20_000 {
                while sent < 20_000 {
                    let Some(index) = free.take() else { break };
                    // SAFETY: taken from the free list, so owned here.
                    let slot = unsafe { table.slot(index) };
                    (slot.id, slot.op, slot.offset) = (sent, IoOp::Write, 512);
                    slot.bufs.clear();
                    workers.submit(ring, index);
                    sent += 1;
                }
                let index = done[usize::from(ring)]
                    .recv_timeout(Duration::from_secs(30))
                    .unwrap();
                // SAFETY: handed back by the worker.
                let slot = unsafe { table.slot(index) };
                // A write with no buffers is a zero-length write: the guard refuses it.
                assert_eq!(slot.status, Status::Error);
                seen[usize::from(ring) * 20_000 + slot.id as usize] += 1;
                free.give(index);
                got += 1;
            }
        }
        assert!(seen.iter().all(|&n| n == 1));
    }
}
