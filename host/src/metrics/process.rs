//! The process's own figures, under the names Prometheus' client libraries use
//! (`process_cpu_seconds_total`, `process_resident_memory_bytes`...), read from `/proc/self`.

use std::fmt::Write;

/// Clock ticks per second and the page size, as the kernel reports them.
fn sysconf(name: libc::c_int) -> Option<u64> {
    // SAFETY: sysconf takes a constant and touches no memory of ours.
    let v = unsafe { libc::sysconf(name) };
    (v > 0).then_some(v as u64)
}

/// What `/proc/self/stat` says, from the field after the command name (which may hold
/// spaces and parentheses, so the text is cut at its last `)`).
struct Stat {
    utime: u64,
    stime: u64,
    threads: u64,
    start_ticks: u64,
    vsize: u64,
    rss_pages: u64,
}

fn stat() -> Option<Stat> {
    let text = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields from 3 (state) on; man proc numbers them from 1.
    let n = |i: usize| -> Option<u64> { f.get(i - 3)?.parse().ok() };
    Some(Stat {
        utime: n(14)?,
        stime: n(15)?,
        threads: n(20)?,
        start_ticks: n(22)?,
        vsize: n(23)?,
        rss_pages: n(24)?,
    })
}

/// Seconds since the epoch when the machine booted (`btime` of `/proc/stat`).
fn boot_time() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

fn open_fds() -> Option<usize> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count())
}

fn max_fds() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Appends the process families to `out`; a figure the system does not give is left out.
pub fn render(out: &mut String) {
    let mut family = |name: &str, kind: &str, help: &str, value: Option<String>| {
        if let Some(v) = value {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {v}");
        }
    };
    let st = stat();
    let ticks = sysconf(libc::_SC_CLK_TCK);
    let page = sysconf(libc::_SC_PAGESIZE);
    family(
        "process_cpu_seconds_total",
        "counter",
        "User and system CPU time spent, in seconds.",
        st.as_ref()
            .zip(ticks)
            .map(|(s, t)| ((s.utime + s.stime) as f64 / t as f64).to_string()),
    );
    family(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        st.as_ref()
            .zip(page)
            .map(|(s, p)| (s.rss_pages * p).to_string()),
    );
    family(
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes.",
        st.as_ref().map(|s| s.vsize.to_string()),
    );
    family(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since the epoch, in seconds.",
        st.as_ref()
            .zip(ticks)
            .zip(boot_time())
            .map(|((s, t), b)| (b as f64 + s.start_ticks as f64 / t as f64).to_string()),
    );
    family(
        "process_threads",
        "gauge",
        "Threads of the process.",
        st.as_ref().map(|s| s.threads.to_string()),
    );
    family(
        "process_open_fds",
        "gauge",
        "Open file descriptors.",
        open_fds().map(|n| n.to_string()),
    );
    family(
        "process_max_fds",
        "gauge",
        "The limit on open file descriptors.",
        max_fds().map(|n| n.to_string()),
    );
}
