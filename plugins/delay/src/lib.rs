//! `delay`: a filter that adds latency to its base disk, for testing how guests and
//! stacks behave on a slow disk.
//!
//! | key | type | default | meaning |
//! |---|---|---|---|
//! | `read_ms` | integer | `0` | milliseconds added to each read |
//! | `write_ms` | integer | `0` | to each write, discard and write-zeroes |
//! | `flush_ms` | integer | `0` | to each flush |
//! | `jitter_ms` | integer | `0` | up to this many extra milliseconds, uniformly random per request |
//!
//! ```text
//! xen-disk-host check delay -c read_ms=5 -c jitter_ms=3 -c base=file -c base.path=disk.img
//! ```
//!
//! Reads and writes are asynchronous ([`ThreadModel::Async`]): each goes to the base at once
//! and its answer is held back on one timer thread of the filter's until `read_ms` (or
//! `write_ms`) plus jitter after the base answered. No thread sleeps per request, so every
//! request the guest sends waits out its delay at the same time, as on a slow device with a
//! deep queue: at 32 requests in flight, `read_ms=2` answers each in about 2 ms, whatever the
//! number of host workers. The base does its I/O on the thread that submits (the host's ring
//! thread) when it is a local disk, and through its own submissions when it is asynchronous
//! (nbd-client, ceph-rbd, another delay); a base that declares the serialized thread model
//! gets one call at a time. Flushes, discards and write-zeroes are blocking calls, so they
//! wait out their delay on the host worker that carries them, and so do the blocking `read`
//! and `write` the host uses outside the ring (`check`, `bench --direct`, emulated FUA).
//! Otherwise the disk is the base's: same size and capabilities.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use xen_disk_plugin_api::*;

/// The filter's disk.
pub struct DelayDisk {
    base: ForeignDisk,
    read: Duration,
    write: Duration,
    flush: Duration,
    jitter_ms: u64,
    rng: AtomicU64,
    /// Held around each base call when the base takes one call at a time.
    serial: Option<Mutex<()>>,
    base_is_async: bool,
    timer: Arc<Timer>,
    timer_thread: Option<JoinHandle<()>>,
}

/// One xorshift64 step: cheap, lock-free and good enough for spreading latencies.
fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// A request whose base I/O is done, waiting for its time to answer.
struct Due {
    at: Instant,
    /// Arrival order, so that equal deadlines answer first come, first served.
    seq: u64,
    submission: Submission,
    result: Result<()>,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    /// Reversed: the heap's top is the earliest deadline.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

#[derive(Default)]
struct TimerState {
    due: BinaryHeap<Due>,
    seq: u64,
    stopped: bool,
}

/// The deadlines of requests held back, and the condition the timer thread sleeps on.
#[derive(Default)]
struct Timer {
    state: Mutex<TimerState>,
    wake: Condvar,
}

impl Timer {
    fn lock(&self) -> MutexGuard<'_, TimerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answers `submission` with `result` at `at` (at once when the timer has stopped).
    fn answer_at(&self, at: Instant, submission: Submission, result: Result<()>) {
        let mut state = self.lock();
        if state.stopped {
            drop(state);
            submission.complete(result);
            return;
        }
        let seq = state.seq;
        state.seq += 1;
        let earliest = state.due.peek().is_none_or(|d| at < d.at);
        state.due.push(Due {
            at,
            seq,
            submission,
            result,
        });
        drop(state);
        if earliest {
            self.wake.notify_one();
        }
    }

    /// The timer thread: answers each request when its time comes, outside the lock (an
    /// answer may reach the guest on this thread). After a stop, answers what is left.
    fn run(&self) {
        let mut ready = Vec::new();
        let mut state = self.lock();
        loop {
            let now = Instant::now();
            while state
                .due
                .peek()
                .is_some_and(|d| d.at <= now || state.stopped)
            {
                ready.extend(state.due.pop());
            }
            if !ready.is_empty() {
                drop(state);
                for d in ready.drain(..) {
                    d.submission.complete(d.result);
                }
                state = self.lock();
                continue;
            }
            if state.stopped {
                return;
            }
            state = match state.due.peek().map(|d| d.at) {
                Some(at) => {
                    self.wake
                        .wait_timeout(state, at.saturating_duration_since(now))
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
                None => self.wake.wait(state).unwrap_or_else(|p| p.into_inner()),
            };
        }
    }
}

impl DelayDisk {
    /// The delay for one request: `base` plus this request's jitter.
    fn delay(&self, base: Duration) -> Duration {
        let extra = if self.jitter_ms == 0 {
            0
        } else {
            let prev = self
                .rng
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |x| Some(xorshift(x)))
                .unwrap_or(1);
            xorshift(prev) % (self.jitter_ms + 1)
        };
        base + Duration::from_millis(extra)
    }

    fn wait(&self, base: Duration) {
        let total = self.delay(base);
        if !total.is_zero() {
            std::thread::sleep(total);
        }
    }

    /// Runs a blocking call on the base, one at a time if the base asks for that.
    fn on_base<T>(&self, f: impl FnOnce(&ForeignDisk) -> T) -> T {
        let _one = self
            .serial
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()));
        f(&self.base)
    }
}

impl Disk for DelayDisk {
    fn info(&self) -> DiskInfo {
        self.base.info().thread_model(ThreadModel::Async)
    }
    fn read(&self, offset: u64, bufs: &mut ReadBufs<'_>) -> Result<()> {
        self.wait(self.read);
        self.on_base(|b| b.read(offset, bufs))
    }
    fn write(&self, offset: u64, bufs: &WriteBufs<'_>) -> Result<()> {
        self.wait(self.write);
        self.on_base(|b| b.write(offset, bufs))
    }
    fn write_fua(&self, offset: u64, bufs: &WriteBufs<'_>) -> Result<()> {
        self.wait(self.write);
        self.on_base(|b| b.write_fua(offset, bufs))
    }
    fn flush(&self) -> Result<()> {
        self.wait(self.flush);
        self.on_base(|b| b.flush())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.wait(self.write);
        self.on_base(|b| b.discard(offset, len))
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.wait(self.write);
        self.on_base(|b| b.write_zeroes(offset, len))
    }

    /// The base does the I/O now; the answer waits on the timer thread.
    fn submit(&self, mut submission: Submission) {
        let delay = self.delay(match submission.op() {
            SubmitOp::Read => self.read,
            SubmitOp::Write | SubmitOp::WriteFua => self.write,
        });
        if self.base_is_async {
            // The base answers on a thread of its own; the delay starts from its answer.
            let (op, offset) = (submission.op(), submission.offset());
            let bufs = submission.raw().to_vec();
            let timer = self.timer.clone();
            let answer = move |result: Result<()>| {
                if delay.is_zero() {
                    submission.complete(result);
                } else {
                    timer.answer_at(Instant::now() + delay, submission, result);
                }
            };
            // SAFETY: the buffers are `submission`'s, valid and ours until it completes,
            // which happens only after the base has completed this one (in `answer`).
            let forwarded = unsafe { Submission::with_closure(op, offset, bufs, answer) };
            return self.base.submit(forwarded);
        }
        let offset = submission.offset();
        let result = match submission.op() {
            SubmitOp::Read => match submission.read_bufs() {
                Some(mut b) => self.on_base(|base| base.read(offset, &mut b)),
                None => Err(Error::msg("a read without read buffers")),
            },
            op => match submission.write_bufs() {
                Some(b) if op == SubmitOp::WriteFua => {
                    self.on_base(|base| base.write_fua(offset, &b))
                }
                Some(b) => self.on_base(|base| base.write(offset, &b)),
                None => Err(Error::msg("a write without write buffers")),
            },
        };
        if delay.is_zero() {
            submission.complete(result);
        } else {
            self.timer
                .answer_at(Instant::now() + delay, submission, result);
        }
    }
}

impl Drop for DelayDisk {
    /// Answers whatever is still held back, then ends the timer thread.
    fn drop(&mut self) {
        self.timer.lock().stopped = true;
        self.timer.wake.notify_one();
        if let Some(t) = self.timer_thread.take() {
            let _ = t.join();
        }
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
        let (read, write, flush, jitter_ms) = (
            Duration::from_millis(ms(config, "read_ms")?),
            Duration::from_millis(ms(config, "write_ms")?),
            Duration::from_millis(ms(config, "flush_ms")?),
            ms(config, "jitter_ms")?,
        );
        let model = base.info().thread_model;
        let timer = Arc::new(Timer::default());
        let timer_thread = {
            let timer = timer.clone();
            std::thread::Builder::new()
                .name("delay-timer".into())
                .spawn(move || timer.run())
                .map_err(|e| Error::from(e).context("delay: starting the timer thread"))?
        };
        Ok(DelayDisk {
            base,
            read,
            write,
            flush,
            jitter_ms,
            rng: AtomicU64::new(0x9e37_79b9_7f4a_7c15),
            serial: (model == ThreadModel::Serialized).then(Mutex::default),
            base_is_async: model == ThreadModel::Async,
            timer,
            timer_thread: Some(timer_thread),
        })
    }
}

export_filter!(DelayFilter);

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::mpsc;

    /// A RAM disk of the given thread model; a serialized one checks that calls never overlap.
    struct Ram {
        data: Mutex<Vec<u8>>,
        model: ThreadModel,
        busy: AtomicBool,
    }

    impl Ram {
        fn enter(&self) {
            if self.model == ThreadModel::Serialized {
                assert!(!self.busy.swap(true, Ordering::SeqCst), "overlapping calls");
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        fn leave(&self) {
            self.busy.store(false, Ordering::SeqCst);
        }
    }

    impl Disk for Ram {
        fn info(&self) -> DiskInfo {
            DiskInfo::new(1 << 20).thread_model(self.model)
        }
        fn read(&self, offset: u64, bufs: &mut ReadBufs<'_>) -> Result<()> {
            self.enter();
            let d = self.data.lock().unwrap();
            bufs.copy_from(&d[offset as usize..][..bufs.len()]);
            self.leave();
            Ok(())
        }
        fn write(&self, offset: u64, bufs: &WriteBufs<'_>) -> Result<()> {
            self.enter();
            let mut d = self.data.lock().unwrap();
            bufs.copy_to(&mut d[offset as usize..][..bufs.len()]);
            self.leave();
            Ok(())
        }
    }

    fn delay_over(model: ThreadModel, read_ms: u64) -> DelayDisk {
        let ram = Ram {
            data: Mutex::new((0..1 << 20).map(|i| (i / 512) as u8).collect()),
            model,
            busy: AtomicBool::new(false),
        };
        let base = ForeignDisk::new(export_disk(ram));
        let config = Config::from_pairs(&[
            format!("read_ms={read_ms}"),
            "write_ms=0".into(),
            "flush_ms=0".into(),
            "jitter_ms=0".into(),
        ])
        .unwrap();
        DelayFilter::open(&config, base).unwrap()
    }

    /// Submits `n` 512-byte reads of sectors 0..n; returns the buffers and, per request, when
    /// it was answered and how.
    #[allow(clippy::type_complexity)]
    fn submit_reads(
        d: &DelayDisk,
        n: usize,
    ) -> (
        Vec<Box<[u8; 512]>>,
        mpsc::Receiver<(usize, Instant, Result<()>)>,
    ) {
        let mut bufs: Vec<Box<[u8; 512]>> = (0..n).map(|_| Box::new([0xffu8; 512])).collect();
        let (tx, rx) = mpsc::channel();
        for (i, b) in bufs.iter_mut().enumerate() {
            let tx = tx.clone();
            // SAFETY: the buffers outlive the submissions: every caller waits for all answers.
            let s = unsafe {
                Submission::with_closure(
                    SubmitOp::Read,
                    i as u64 * 512,
                    vec![RawBuf::from_mut(&mut b[..])],
                    move |r| {
                        let _ = tx.send((i, Instant::now(), r));
                    },
                )
            };
            d.submit(s);
        }
        (bufs, rx)
    }

    #[test]
    fn requests_in_flight_wait_out_their_delays_together() {
        // A second: long beside what a loaded machine adds to 32 submissions and answers.
        let delay = Duration::from_secs(1);
        let d = delay_over(ThreadModel::Parallel, 1000);
        assert_eq!(d.info().thread_model, ThreadModel::Async);
        let t0 = Instant::now();
        let (bufs, rx) = submit_reads(&d, 32);
        // Submitting does not wait out the delay: no thread sleeps per request.
        assert!(
            t0.elapsed() < delay,
            "32 submissions took {:?}",
            t0.elapsed()
        );
        let answers: Vec<_> = (0..32).map(|_| rx.recv().unwrap()).collect();
        let last = answers.iter().map(|a| a.1).max().unwrap();
        for (i, at, r) in &answers {
            r.as_ref().unwrap();
            assert!(
                *at - t0 >= delay,
                "request {i} answered after {:?}",
                *at - t0
            );
        }
        // Thirty-two at once take about one delay, not thirty-two (nor sixteen, as two
        // sleeping workers made them); a loaded machine gets two more.
        assert!(
            last - t0 < 3 * delay,
            "the last answer came after {:?}",
            last - t0
        );
        for (i, b) in bufs.iter().enumerate() {
            assert!(
                b.iter().all(|&x| x == i as u8),
                "request {i} read the wrong bytes"
            );
        }
    }

    #[test]
    fn a_serialized_base_gets_one_call_at_a_time_and_a_drop_answers_what_is_held() {
        let d = Arc::new(delay_over(ThreadModel::Serialized, 60_000));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let d = d.clone();
                std::thread::spawn(move || {
                    let (bufs, rx) = submit_reads(&d, 8);
                    (bufs, rx)
                })
            })
            .collect();
        let held: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        // A minute's delay: closing the disk answers them all now, with what the base said.
        let t0 = Instant::now();
        drop(Arc::into_inner(d).unwrap());
        for (bufs, rx) in &held {
            for _ in 0..8 {
                let (i, _, r) = rx.recv_timeout(Duration::from_secs(30)).unwrap();
                r.unwrap();
                assert!(bufs[i].iter().all(|&x| x == i as u8));
            }
        }
        // Answered now, not after the minute's delay.
        assert!(t0.elapsed() < Duration::from_secs(30));
    }
}
