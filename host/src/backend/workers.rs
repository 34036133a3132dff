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

use super::inflight::SlotTable;
use super::io::{execute, status_of};
use crate::plugin::GuardedDisk;
use crossbeam_channel::{bounded, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

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

/// The pool.
pub struct Workers {
    submit: Option<Sender<(u8, u16)>>,
    threads: Vec<JoinHandle<()>>,
    done: Vec<Sender<u16>>,
}

/// A ring's end of the pool: where its completions arrive.
pub type Completions = Receiver<u16>;

/// What a ring brings to the pool: its slots and how to wake its thread.
pub type RingParts<M> = (Arc<SlotTable<M>>, Arc<dyn Wake>);

impl Workers {
    /// Starts `threads` workers serving `rings` on `disk`. Returns the pool and, per ring,
    /// the receiver of its completions.
    pub fn start<M: Send + 'static>(
        threads: usize,
        disk: Arc<GuardedDisk>,
        rings: Vec<RingParts<M>>,
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
        let shares = Arc::new(shares);
        let threads = (0..threads)
            .map(|i| {
                let (jobs, shares, disk) = (jobs.clone(), shares.clone(), disk.clone());
                std::thread::Builder::new()
                    .name(format!("xen-disk-io-{i}"))
                    .spawn(move || {
                        for (ring, index) in jobs.iter() {
                            let share = &shares[usize::from(ring)];
                            // SAFETY: the ring thread gave this index away through the channel
                            // and does not touch the slot until it comes back on `done`.
                            let slot = unsafe { share.slots.slot(index) };
                            // SAFETY: the slot's buffers point into its own live mappings.
                            let result =
                                unsafe { execute(&disk, slot.op, slot.offset, &slot.bufs) };
                            if let Err(e) = &result {
                                tracing::debug!(
                                    id = slot.id,
                                    offset = slot.offset,
                                    "request failed: {e}"
                                );
                            }
                            slot.status = status_of(&result);
                            // Only the ring thread drops the receiver, after the workers stop.
                            let _ = share.done.send(index);
                            share.wake.wake();
                        }
                    })
                    .expect("spawn an I/O worker thread")
            })
            .collect();
        (
            Workers {
                submit: Some(submit),
                threads,
                done,
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
        }
    }
}

impl Drop for Workers {
    /// Stops taking work; workers finish what they have, then exit.
    fn drop(&mut self) {
        self.submit = None;
        for t in self.threads.drain(..) {
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

    /// Reads at offset 0 take 300 ms; everything else is instant.
    struct Slow;
    impl Disk for Slow {
        fn info(&self) -> DiskInfo {
            DiskInfo::new(1 << 20)
        }
        fn read(&self, offset: u64, bufs: &mut ReadBufs<'_>) -> Result<()> {
            if offset == 0 {
                std::thread::sleep(Duration::from_millis(300));
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
            let index = done[0].recv_timeout(Duration::from_secs(5)).unwrap();
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
        // The slow request (id 0) completes last, the others long before it.
        assert_eq!(*order.last().unwrap(), 0, "{order:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(free.in_use(8), 0);
        // A worker wakes the ring just after handing a slot back: join them before counting.
        drop(workers);
        assert!(wake.0.load(Ordering::SeqCst) >= 8);
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
                    .recv_timeout(Duration::from_secs(5))
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
