//! Where a run's CPU went, per request: this whole process (the plugin's and the library's
//! threads included), its client side (the simulated guest and the ring thread, or a fair
//! reference's submitting thread), and how busy the machine was meanwhile.
//!
//! A ring run pays for a guest that a real host does not: on a real Xen host the guest runs
//! on its own virtual CPUs, in the bench it shares the machine with the storage it drives.
//! When the machine is saturated (the cluster's daemons and the library's threads want every
//! CPU), each microsecond the simulated guest spends is one the storage does not get. These
//! figures say how large that share was, beside the reference's, from the same run.

use std::time::Duration;

/// CPU time (user and system) the calling thread has used since it started.
pub fn thread_cpu() -> Duration {
    clock(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// CPU time (user and system) every thread of this process has used, the ended ones too.
fn process_cpu() -> Duration {
    clock(libc::CLOCK_PROCESS_CPUTIME_ID)
}

fn clock(id: libc::clockid_t) -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a live timespec; both clock ids are valid on Linux for the caller.
    let r = unsafe { libc::clock_gettime(id, &mut t) };
    if r != 0 {
        return Duration::ZERO;
    }
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// The machine's CPU time so far, in clock ticks, from `/proc/stat`'s first line.
#[derive(Debug, Clone, Copy, PartialEq)]
struct MachineTicks {
    /// user, nice, system, irq, softirq (a guest's own time is inside user).
    busy: u64,
    /// idle and iowait.
    idle: u64,
    /// Time the hypervisor gave another virtual machine while this one wanted to run.
    steal: u64,
}

impl MachineTicks {
    fn now() -> Option<MachineTicks> {
        Self::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    fn parse(stat: &str) -> Option<MachineTicks> {
        let line = stat.lines().next()?;
        let mut words = line.split_ascii_whitespace();
        if words.next()? != "cpu" {
            return None;
        }
        let v: Vec<u64> = words
            .take(8)
            .map(|w| w.parse().ok())
            .collect::<Option<_>>()?;
        let field = |i: usize| v.get(i).copied().unwrap_or(0);
        Some(MachineTicks {
            busy: field(0) + field(1) + field(2) + field(5) + field(6),
            idle: field(3) + field(4),
            steal: field(7),
        })
    }

    /// Shares of the time between `self` and `later` that were busy and stolen.
    fn shares(&self, later: &MachineTicks) -> Option<(f64, f64)> {
        let busy = later.busy.checked_sub(self.busy)?;
        let idle = later.idle.checked_sub(self.idle)?;
        let steal = later.steal.checked_sub(self.steal)?;
        let total = (busy + idle + steal) as f64;
        (total > 0.0).then(|| (busy as f64 / total, steal as f64 / total))
    }
}

/// Started before a run's first request, stopped after its last answer.
pub struct Meter {
    process: Duration,
    /// The starting thread's own CPU time, for [`Meter::stop_here`].
    thread: Duration,
    machine: Option<MachineTicks>,
}

impl Meter {
    pub fn start() -> Meter {
        Meter {
            process: process_cpu(),
            thread: thread_cpu(),
            machine: MachineTicks::now(),
        }
    }

    /// As [`Meter::stop`], on the thread that started the meter and was the whole client
    /// side (a fair reference's or `--submit`'s submitting thread).
    pub fn stop_here(self, ops: u64) -> CpuFigures {
        let client = thread_cpu().saturating_sub(self.thread);
        self.stop(ops, client, None)
    }

    /// The figures for `ops` requests; `client` is the client side's CPU time and `guest`
    /// the simulated guest's part of it (a ring run), both measured by their own threads.
    pub fn stop(self, ops: u64, client: Duration, guest: Option<Duration>) -> CpuFigures {
        let per_op = |d: Duration| d.as_secs_f64() * 1e6 / ops.max(1) as f64;
        let machine = match (self.machine, MachineTicks::now()) {
            (Some(a), Some(b)) => a.shares(&b),
            _ => None,
        };
        CpuFigures {
            process_us: per_op(process_cpu().saturating_sub(self.process)),
            client_us: per_op(client),
            guest_us: guest.map(per_op),
            machine,
        }
    }
}

/// CPU microseconds per request answered, and the machine's load over the run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuFigures {
    /// Every thread of this process.
    pub process_us: f64,
    /// The client side: the simulated guest and ring threads, or the submitting thread.
    pub client_us: f64,
    /// The simulated guest's part of `client_us` (ring runs only).
    pub guest_us: Option<f64>,
    /// Shares of the machine's CPU time that were busy and stolen (None where `/proc/stat`
    /// cannot be read).
    pub machine: Option<(f64, f64)>,
}

impl CpuFigures {
    /// The JSON fields, each named `PREFIX_...` (or without a prefix for the plugin's run).
    pub fn json(&self, prefix: &str) -> String {
        let p = if prefix.is_empty() {
            String::new()
        } else {
            format!("{prefix}_")
        };
        let mut s = format!(
            ",\"{p}cpu_us_per_op\":{:.3},\"{p}client_cpu_us_per_op\":{:.3}",
            self.process_us, self.client_us
        );
        if let Some(g) = self.guest_us {
            s += &format!(",\"{p}guest_cpu_us_per_op\":{g:.3}");
        }
        if let Some((busy, steal)) = self.machine {
            s += &format!(",\"{p}machine_busy\":{busy:.4},\"{p}machine_steal\":{steal:.4}");
        }
        s
    }

    /// The text line; `client` names the client side.
    pub fn line(&self, client: &str) -> String {
        let guest = self
            .guest_us
            .map(|g| format!(", {g:.1} us of it the simulated guest"))
            .unwrap_or_default();
        let machine = self
            .machine
            .map(|(busy, steal)| {
                format!(
                    "; machine {:.0}% busy, {:.0}% stolen",
                    100.0 * busy,
                    100.0 * steal
                )
            })
            .unwrap_or_default();
        format!(
            "  cpu:    per request {:.1} us in this process, {:.1} us on {client}{guest}{machine}",
            self.process_us, self.client_us
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_splits_into_busy_idle_and_stolen() {
        let a = MachineTicks::parse("cpu  100 5 50 1000 20 3 2 10 0 0\ncpu0 1 2 3\n").unwrap();
        assert_eq!(
            a,
            MachineTicks {
                busy: 160,
                idle: 1020,
                steal: 10
            }
        );
        let b = MachineTicks {
            busy: 460,
            idle: 1120,
            steal: 110,
        };
        let (busy, steal) = a.shares(&b).unwrap();
        assert!((busy - 0.6).abs() < 1e-9 && (steal - 0.2).abs() < 1e-9);
        // A counter that went backwards (another boot's figures) gives nothing, not a share.
        assert_eq!(b.shares(&a), None);
        assert_eq!(MachineTicks::parse("intr 1 2 3\n"), None);
        assert_eq!(MachineTicks::parse("cpu 1 x 3\n"), None);
    }

    #[test]
    fn a_spinning_thread_shows_in_its_own_and_the_process_time() {
        let meter = Meter::start();
        let t0 = thread_cpu();
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let spun = thread_cpu() - t0;
        // Most of 50 ms of wall time spinning is CPU time, even with a neighbour stealing some.
        assert!(spun >= Duration::from_millis(10), "{spun:?}");
        let f = meter.stop(10, spun, Some(spun / 2));
        let here = Meter::start().stop_here(1);
        assert!(here.client_us >= 0.0 && here.guest_us.is_none(), "{here:?}");
        assert!(f.process_us >= f.client_us * 0.99, "{f:?}");
        assert!(
            (f.client_us - spun.as_secs_f64() * 1e5).abs() < 1e-6,
            "{f:?}"
        );
        let j = f.json("rbd_fair");
        assert!(j.contains("\"rbd_fair_cpu_us_per_op\":") && j.contains("rbd_fair_guest_cpu"));
        assert!(f.json("").starts_with(",\"cpu_us_per_op\":"));
        assert!(f.line("the client").contains("simulated guest"));
    }
}
