//! The ring's clock for latency: read at most once per pass over the ring, and on only one
//! request in N where reading it is a system call.
//!
//! In a PV dom0 whose clocksource is `xen` (and under any clocksource the vDSO cannot read,
//! such as `hpet`), every `clock_gettime` traps into the kernel and, in a PV guest, through
//! the hypervisor. The lab's dom0 made 1.1 such calls per request even with one reading per
//! pass, as many as the `preadv` that does the I/O. Where that is so, the ring times a
//! sample of its requests (one in [`SAMPLED_EVERY`]) and counts every request as before:
//! percentiles stay meaningful, the latency histogram's count is the sample's size.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Where the clock is a system call, one request in this many is timed.
pub const SAMPLED_EVERY: u32 = 16;

/// Overrides the automatic choice: `1` times every request, `N` one in N.
pub const SAMPLE_ENV: &str = "XEN_DISK_LATENCY_SAMPLE";

/// A `clock_gettime` slower than this, and many times slower than the tick clock that
/// never leaves the vDSO, is taken for a system call (the vDSO's takes tens of
/// nanoseconds; a trap hundreds, or microseconds through a hypervisor).
const SYSCALL_NS: f64 = 150.0;

/// How many requests per timed one, for every ring of this process: from
/// [`SAMPLE_ENV`] when set, else measured once (see [`clock_is_a_syscall`]).
pub fn sample_every() -> u32 {
    static EVERY: OnceLock<u32> = OnceLock::new();
    *EVERY.get_or_init(|| match std::env::var(SAMPLE_ENV) {
        Ok(v) => match v.trim().parse::<u32>() {
            Ok(n) if n >= 1 => {
                if n > 1 {
                    tracing::info!("latency is timed on one request in {n} ({SAMPLE_ENV})");
                }
                n
            }
            _ => {
                tracing::warn!(
                    "{SAMPLE_ENV}={v:?} is not a whole number of requests of at least 1; \
                     choosing by the clock's cost"
                );
                measured_every()
            }
        },
        Err(_) => measured_every(),
    })
}

fn measured_every() -> u32 {
    let (fine, coarse) = clock_costs();
    if clock_is_a_syscall(fine, coarse) {
        tracing::info!(
            "reading the clock costs {fine:.0} ns here (a system call: the vDSO cannot read \
             this clocksource); latency is timed on one request in {SAMPLED_EVERY}"
        );
        SAMPLED_EVERY
    } else {
        1
    }
}

/// Whether the fine clock's cost (ns per reading) says it is a system call, given the cost
/// of the coarse clock, which the vDSO always serves.
pub fn clock_is_a_syscall(fine_ns: f64, coarse_ns: f64) -> bool {
    fine_ns > SYSCALL_NS && fine_ns > 4.0 * coarse_ns.max(1.0)
}

/// The cost of one reading of `CLOCK_MONOTONIC` and of `CLOCK_MONOTONIC_COARSE`, in
/// nanoseconds: the least of a few rounds, so a preemption does not count.
fn clock_costs() -> (f64, f64) {
    let cost = |clock: libc::clockid_t| {
        (0..5)
            .map(|_| {
                const N: u32 = 200;
                let mut ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                let t = Instant::now();
                for _ in 0..N {
                    // SAFETY: `ts` is a valid, writable timespec.
                    unsafe { libc::clock_gettime(clock, &mut ts) };
                }
                t.elapsed().as_nanos() as f64 / f64::from(N)
            })
            .fold(f64::INFINITY, f64::min)
    };
    (
        cost(libc::CLOCK_MONOTONIC),
        cost(libc::CLOCK_MONOTONIC_COARSE),
    )
}

/// One ring's clock: which requests are timed, and this pass's reading.
pub(super) struct LatencyClock {
    every: u32,
    /// Requests taken since the last timed one.
    since: u32,
    reading: Option<Instant>,
}

impl LatencyClock {
    /// Times one request in `every` (1: all of them).
    pub(super) fn new(every: u32) -> LatencyClock {
        LatencyClock {
            every: every.max(1),
            since: 0,
            reading: None,
        }
    }

    /// A new pass over the ring: the next reading is taken afresh.
    pub(super) fn new_pass(&mut self) {
        self.reading = None;
    }

    fn now(&mut self) -> Instant {
        *self.reading.get_or_insert_with(Instant::now)
    }

    /// A request is taken off the ring: when it is one to time, the time it was taken.
    pub(super) fn taken(&mut self) -> Option<Instant> {
        self.since += 1;
        if self.since < self.every {
            return None;
        }
        self.since = 0;
        Some(self.now())
    }

    /// A request taken at `started` (None: not timed) is answered: how long it took.
    pub(super) fn answered(&mut self, started: Option<Instant>) -> Option<Duration> {
        started.map(|s| self.now().saturating_duration_since(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_request_in_n_is_timed() {
        let mut c = LatencyClock::new(4);
        let timed = (0..16).filter(|_| c.taken().is_some()).count();
        assert_eq!(timed, 4);
        let mut all = LatencyClock::new(1);
        assert!((0..16).all(|_| all.taken().is_some()));
        // 0 cannot mean "never": it is taken as 1.
        assert!(LatencyClock::new(0).taken().is_some());
    }

    #[test]
    fn an_untimed_request_reads_no_clock_and_a_pass_reads_it_once() {
        let mut c = LatencyClock::new(2);
        assert_eq!(c.answered(None), None);
        assert!(c.reading.is_none(), "an untimed answer read the clock");
        assert!(c.taken().is_none());
        let t = c.taken().expect("the second request is timed");
        // Within one pass the reading stands: an answer in the same pass took no time.
        assert_eq!(c.answered(Some(t)), Some(Duration::ZERO));
        c.new_pass();
        std::thread::sleep(Duration::from_millis(2));
        assert!(c.answered(Some(t)).unwrap() >= Duration::from_millis(2));
    }

    #[test]
    fn a_trapping_clock_is_told_from_the_vdso() {
        // Figures of the kind measured: a vDSO clock beside its tick clock, a trap on bare
        // metal, a trap through Xen, and everything slowed tenfold by emulation.
        assert!(!clock_is_a_syscall(22.0, 6.0));
        assert!(clock_is_a_syscall(450.0, 6.0));
        assert!(clock_is_a_syscall(9000.0, 60.0));
        assert!(!clock_is_a_syscall(200.0, 60.0));
        // This machine's clock is read one way or the other; the cost is finite and positive.
        let (fine, coarse) = clock_costs();
        assert!(
            fine > 0.0 && fine.is_finite() && coarse.is_finite(),
            "{fine} {coarse}"
        );
    }
}
