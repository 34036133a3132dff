//! The ring's clock for latency: read at most once per pass over the ring, and on only one
//! request in N where reading it is a system call.
//!
//! The vDSO reads the clock without entering the kernel only for some clocksources (`tsc`,
//! `kvm-clock`, Hyper-V's TSC page, arm64's counter). A PV dom0 runs on `xen` (the kernel
//! switches to it when it finds the TSC unstable, as it does under emulation, possibly
//! minutes after boot): there every `clock_gettime` traps into the kernel through the
//! hypervisor. The lab's dom0 then made 1.1 such calls per request even with one reading per
//! pass, as many as the `preadv` doing the I/O. On such a clocksource the ring times one
//! request in [`SAMPLED_EVERY`] and counts every request as before: percentiles stay
//! meaningful, and the latency histogram's count is the sample's size. A ring looks at the
//! clocksource again every [`RECHECK_EVERY`] requests, so a switch after it started counts.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Where the clock is a system call, one request in this many is timed.
pub const SAMPLED_EVERY: u32 = 16;

/// Requests between two looks at the clocksource (a sysfs read: three system calls).
pub const RECHECK_EVERY: u32 = 8192;

/// Overrides the choice for the whole process: `1` times every request, `N` one in N.
pub const SAMPLE_ENV: &str = "XEN_DISK_LATENCY_SAMPLE";

const CLOCKSOURCE: &str = "/sys/devices/system/clocksource/clocksource0/current_clocksource";

/// Clocksources the vDSO reads in user space.
const VDSO_CLOCKSOURCES: &[&str] = &[
    "tsc",
    "tsc-early",
    "kvm-clock",
    "hyperv_clocksource_tsc_page",
    "arch_sys_counter",
];

/// The sampling [`SAMPLE_ENV`] sets for the process, if it is set (and valid).
fn forced() -> Option<u32> {
    static FORCED: OnceLock<Option<u32>> = OnceLock::new();
    *FORCED.get_or_init(|| {
        let v = std::env::var(SAMPLE_ENV).ok()?;
        match v.trim().parse::<u32>() {
            Ok(n) if n >= 1 => {
                if n > 1 {
                    tracing::info!("latency is timed on one request in {n} ({SAMPLE_ENV})");
                }
                Some(n)
            }
            _ => {
                tracing::warn!(
                    "{SAMPLE_ENV}={v:?} is not a whole number of requests of at least 1; \
                     choosing by the clocksource"
                );
                None
            }
        }
    })
}

/// How many requests per timed one for a ring starting now: [`SAMPLE_ENV`] when set, else
/// by the current clocksource.
pub fn sample_every() -> u32 {
    forced().unwrap_or_else(by_clocksource)
}

fn by_clocksource() -> u32 {
    let source = std::fs::read_to_string(CLOCKSOURCE).ok();
    let source = source.as_deref().map(str::trim);
    let every = every_for(source);
    // Said once per change, not per ring.
    static SAID: AtomicU32 = AtomicU32::new(1);
    if SAID.swap(every, Ordering::Relaxed) != every {
        let source = source.unwrap_or("?");
        if every > 1 {
            tracing::info!(
                "clocksource {source}: reading the clock is a system call (the vDSO cannot \
                 read it); latency is timed on one request in {every}"
            );
        } else {
            tracing::info!("clocksource {source}: latency is timed on every request");
        }
    }
    every
}

/// Requests per timed one on `clocksource` (None: unknown, as without sysfs).
pub fn every_for(clocksource: Option<&str>) -> u32 {
    match clocksource {
        Some(s) if !VDSO_CLOCKSOURCES.contains(&s) => SAMPLED_EVERY,
        _ => 1,
    }
}

/// One ring's clock: which requests are timed, and this pass's reading.
pub(super) struct LatencyClock {
    every: u32,
    /// Chosen by the clocksource, and looked at again now and then.
    automatic: bool,
    /// Requests taken since the last timed one.
    since: u32,
    /// Requests until the next look at the clocksource.
    until_recheck: u32,
    reading: Option<Instant>,
}

impl LatencyClock {
    /// Times one request in `every` (1: all of them; 0: as [`sample_every`] says, looked
    /// at again every [`RECHECK_EVERY`] requests).
    pub(super) fn new(every: u32) -> LatencyClock {
        let automatic = every == 0 && forced().is_none();
        LatencyClock {
            every: if every == 0 { sample_every() } else { every },
            automatic,
            since: 0,
            until_recheck: RECHECK_EVERY,
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
        if self.automatic {
            self.until_recheck -= 1;
            if self.until_recheck == 0 {
                self.until_recheck = RECHECK_EVERY;
                self.every = by_clocksource();
            }
        }
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
        // 0 is the automatic choice: every request or one in SAMPLED_EVERY, never none.
        let mut auto = LatencyClock::new(0);
        let timed = (0..2 * RECHECK_EVERY)
            .filter(|_| auto.taken().is_some())
            .count();
        assert!(timed as u32 >= 2 * RECHECK_EVERY / SAMPLED_EVERY, "{timed}");
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
    fn clocksources_the_vdso_cannot_read_are_sampled() {
        assert_eq!(every_for(Some("tsc")), 1);
        assert_eq!(every_for(Some("kvm-clock")), 1);
        assert_eq!(every_for(Some("arch_sys_counter")), 1);
        assert_eq!(every_for(Some("xen")), SAMPLED_EVERY);
        assert_eq!(every_for(Some("hpet")), SAMPLED_EVERY);
        assert_eq!(every_for(Some("acpi_pm")), SAMPLED_EVERY);
        assert_eq!(every_for(None), 1);
    }
}
