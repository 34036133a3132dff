//! Prometheus metrics: the text exposition of a process's devices (the same list `ctl list`
//! reads, [`Registry::devices`]) and of the process itself, served over HTTP by [`http`].
//!
//! Every device's series carry the labels `domain` (the guest's name), `domid`, `vbd` and
//! `plugin` (its stack, "cow over vhd" style; a swap starts new series). Counters count since
//! the device's guest connected (a reconnect starts them again, which Prometheus' `rate`
//! takes as a counter reset). Nothing here runs on the ring path: a scrape reads the same
//! relaxed counters `ctl stats` does.
//!
//! The latency histogram's buckets come from the queue's log-linear histogram (about 6%
//! resolution), so a sample near a boundary may land in the next bucket; `_sum` is estimated
//! from the buckets in the same way.

pub mod http;
pub mod process;

use crate::backend::registry::{Entry, Registry};
use crate::backend::stats::{ATTACHES, DETACHES};
use crate::histogram::Histogram;
use crate::xen::xenstore::client::REQUESTS as XENSTORE_REQUESTS;
use std::fmt::Write;
use std::sync::atomic::Ordering;

/// The latency buckets' upper bounds, in seconds: 10 µs to 10 s, as storage spans them.
pub const LATENCY_BUCKETS: &[f64] = &[
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3,
    250e-3, 500e-3, 1.0, 2.5, 5.0, 10.0,
];

/// One metric's family header and samples, written as the text format wants them grouped.
struct Family<'a> {
    out: &'a mut String,
}

impl<'a> Family<'a> {
    fn new(out: &'a mut String, name: &str, kind: &str, help: &str) -> Family<'a> {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        Family { out }
    }

    fn sample(&mut self, name: &str, labels: &str, value: impl std::fmt::Display) {
        if labels.is_empty() {
            let _ = writeln!(self.out, "{name} {value}");
        } else {
            let _ = writeln!(self.out, "{name}{{{labels}}} {value}");
        }
    }
}

/// A label value, escaped as the text format asks (backslash, double quote, newline).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One device, read once for a scrape.
struct Device {
    labels: String,
    reads: u64,
    writes: u64,
    flushes: u64,
    discards: u64,
    read_bytes: u64,
    write_bytes: u64,
    errors: u64,
    unsupported: u64,
    in_flight: u64,
    depth: u64,
    latency: Histogram,
    size: u64,
    state: u8,
    swaps: u64,
    swap_pause_ns: u64,
    throttled: u64,
    sleeps: u64,
    limits: crate::backend::limits::IoLimits,
}

impl Device {
    fn read(e: &Entry) -> Device {
        let labels = format!(
            "domain=\"{}\",domid=\"{}\",vbd=\"{}\",plugin=\"{}\"",
            escape(&e.guest),
            e.domid,
            escape(&e.vbd),
            escape(&e.stack())
        );
        let mut d = Device {
            labels,
            reads: 0,
            writes: 0,
            flushes: 0,
            discards: 0,
            read_bytes: 0,
            write_bytes: 0,
            errors: 0,
            unsupported: 0,
            in_flight: 0,
            depth: 0,
            latency: Histogram::default(),
            size: e.disk.size(),
            state: e.stats.state.load(Ordering::Relaxed),
            swaps: e.stats.swaps.load(Ordering::Relaxed),
            swap_pause_ns: e.stats.swap_pause_ns.load(Ordering::Relaxed),
            throttled: e.stats.limiter.throttled(),
            sleeps: 0,
            limits: e.stats.limiter.limits(),
        };
        let queues = e.stats.queues.lock().unwrap_or_else(|p| p.into_inner());
        for q in queues.iter() {
            let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            d.reads += l(&q.reads);
            d.writes += l(&q.writes);
            d.flushes += l(&q.flushes);
            d.discards += l(&q.discards);
            d.read_bytes += l(&q.read_bytes);
            d.write_bytes += l(&q.write_bytes);
            d.errors += l(&q.errors);
            d.unsupported += l(&q.unsupported);
            d.in_flight += l(&q.in_flight);
            d.depth += l(&q.depth);
            d.sleeps += l(&q.sleeps);
            d.latency.merge(&q.latency.snapshot());
        }
        d
    }
}

/// Seconds, as Prometheus prints floats.
fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// The whole exposition: every device of `registry`, the process-wide events and the
/// process's own figures.
pub fn render(registry: &Registry) -> String {
    let devices: Vec<Device> = registry.devices().iter().map(|e| Device::read(e)).collect();
    let mut out = String::new();
    let per_device = |out: &mut String,
                      name: &str,
                      kind: &str,
                      help: &str,
                      values: &dyn Fn(&Device) -> Vec<(&'static str, u64)>| {
        let mut f = Family::new(out, name, kind, help);
        for d in &devices {
            for (extra, v) in values(d) {
                let labels = if extra.is_empty() {
                    d.labels.clone()
                } else {
                    format!("{},{extra}", d.labels)
                };
                f.sample(name, &labels, v);
            }
        }
    };
    per_device(
        &mut out,
        "xen_disk_requests_total",
        "counter",
        "Requests served, by operation (flush counts flushes and barriers without data).",
        &|d| {
            vec![
                ("op=\"read\"", d.reads),
                ("op=\"write\"", d.writes),
                ("op=\"flush\"", d.flushes),
                ("op=\"discard\"", d.discards),
            ]
        },
    );
    per_device(
        &mut out,
        "xen_disk_bytes_total",
        "counter",
        "Bytes moved by successful requests, by operation.",
        &|d| {
            vec![
                ("op=\"read\"", d.read_bytes),
                ("op=\"write\"", d.write_bytes),
            ]
        },
    );
    per_device(
        &mut out,
        "xen_disk_request_errors_total",
        "counter",
        "Requests answered with an error (status=\"error\") or as not supported (status=\"unsupported\").",
        &|d| {
            vec![
                ("status=\"error\"", d.errors),
                ("status=\"unsupported\"", d.unsupported),
            ]
        },
    );
    per_device(
        &mut out,
        "xen_disk_requests_in_flight",
        "gauge",
        "Requests handed to the plugin and not yet answered.",
        &|d| vec![("", d.in_flight)],
    );
    per_device(
        &mut out,
        "xen_disk_queue_depth",
        "gauge",
        "Requests taken off the rings and not yet answered, including any held back by a limit or a barrier.",
        &|d| vec![("", d.depth)],
    );
    {
        let name = "xen_disk_request_duration_seconds";
        let mut f = Family::new(
            &mut out,
            name,
            "histogram",
            "Time from starting a request (after any wait for a limit) to answering it.",
        );
        for d in &devices {
            for &le in LATENCY_BUCKETS {
                let n = d.latency.count_at_most((le * 1e9) as u64);
                f.sample(
                    &format!("{name}_bucket"),
                    &format!("{},le=\"{le}\"", d.labels),
                    n,
                );
            }
            let total = d.latency.count();
            f.sample(
                &format!("{name}_bucket"),
                &format!("{},le=\"+Inf\"", d.labels),
                total,
            );
            f.sample(
                &format!("{name}_sum"),
                &d.labels,
                secs(d.latency.estimated_sum()),
            );
            f.sample(&format!("{name}_count"), &d.labels, total);
        }
    }
    per_device(
        &mut out,
        "xen_disk_size_bytes",
        "gauge",
        "The disk's size as the guest was last told.",
        &|d| vec![("", d.size)],
    );
    per_device(
        &mut out,
        "xen_disk_state",
        "gauge",
        "The device's xenbus state (1 Initialising, 2 InitWait, 3 Initialised, 4 Connected, 5 Closing, 6 Closed).",
        &|d| vec![("", u64::from(d.state))],
    );
    per_device(
        &mut out,
        "xen_disk_swaps_total",
        "counter",
        "Plugins swapped in under the running guest.",
        &|d| vec![("", d.swaps)],
    );
    {
        let name = "xen_disk_swap_pause_seconds_total";
        let mut f = Family::new(
            &mut out,
            name,
            "counter",
            "Time the disk was paused for swaps, added up.",
        );
        for d in &devices {
            f.sample(name, &d.labels, secs(d.swap_pause_ns));
        }
    }
    per_device(
        &mut out,
        "xen_disk_ring_sleeps_total",
        "counter",
        "Times the disk's ring threads went to sleep, waiting for the guest or a completion \
         (idle rings sleep once and stay asleep).",
        &|d| vec![("", d.sleeps)],
    );
    per_device(
        &mut out,
        "xen_disk_throttled_requests_total",
        "counter",
        "Requests held back by the disk's I/O limits (each counted once).",
        &|d| vec![("", d.throttled)],
    );
    per_device(
        &mut out,
        "xen_disk_limit_iops",
        "gauge",
        "The disk's IOPS limit by direction (absent: unlimited).",
        &|d| {
            let mut v = Vec::new();
            if let Some(r) = d.limits.read_iops {
                v.push(("dir=\"read\"", r.per_second));
            }
            if let Some(r) = d.limits.write_iops {
                v.push(("dir=\"write\"", r.per_second));
            }
            v
        },
    );
    per_device(
        &mut out,
        "xen_disk_limit_bytes_per_second",
        "gauge",
        "The disk's bandwidth limit by direction (absent: unlimited).",
        &|d| {
            let mut v = Vec::new();
            if let Some(r) = d.limits.read_bps {
                v.push(("dir=\"read\"", r.per_second));
            }
            if let Some(r) = d.limits.write_bps {
                v.push(("dir=\"write\"", r.per_second));
            }
            v
        },
    );
    Family::new(
        &mut out,
        "xen_disk_devices",
        "gauge",
        "Devices this process serves now.",
    )
    .sample("xen_disk_devices", "", devices.len());
    Family::new(
        &mut out,
        "xen_disk_attaches_total",
        "counter",
        "Connections of a guest to a device since the process started.",
    )
    .sample(
        "xen_disk_attaches_total",
        "",
        ATTACHES.load(Ordering::Relaxed),
    );
    Family::new(
        &mut out,
        "xen_disk_detaches_total",
        "counter",
        "Connections that ended since the process started.",
    )
    .sample(
        "xen_disk_detaches_total",
        "",
        DETACHES.load(Ordering::Relaxed),
    );
    Family::new(
        &mut out,
        "xen_disk_xenstore_requests_total",
        "counter",
        "Requests this process sent to xenstored.",
    )
    .sample(
        "xen_disk_xenstore_requests_total",
        "",
        XENSTORE_REQUESTS.load(Ordering::Relaxed),
    );
    process::render(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::device::DeviceStats;
    use crate::backend::queue::QueueStats;
    use crate::plugin::GuardedDisk;
    use std::sync::atomic::AtomicBool;
    use std::sync::{Arc, Mutex};

    use crate::test_disks::Blank;

    #[test]
    fn the_exposition_names_each_device_and_counts_what_it_served() {
        let registry = Registry::default();
        let stats = Arc::new(DeviceStats::default());
        let q = Arc::new(QueueStats::default());
        q.reads.store(7, Ordering::Relaxed);
        q.read_bytes.store(7 * 4096, Ordering::Relaxed);
        q.writes.store(2, Ordering::Relaxed);
        for ns in [5_000u64, 20_000, 3_000_000] {
            q.latency.record(ns);
        }
        *stats.queues.lock().unwrap() = vec![q.clone(), Arc::new(QueueStats::default())];
        stats.limiter.set(crate::backend::limits::IoLimits {
            read_iops: Some(crate::backend::limits::Rate::new(500)),
            ..Default::default()
        });
        registry.add(Entry {
            id: "3/xvdb".into(),
            domid: 3,
            guest: "web \"1\"".into(),
            vbd: "xvdb".into(),
            stack: Mutex::new("cow over file".into()),
            disk: Arc::new(GuardedDisk::new(Box::new(Blank), false).unwrap()),
            stats,
            stop: Arc::new(AtomicBool::new(false)),
            journal: None,
        });
        let text = render(&registry);
        let l = r#"domain="web \"1\"",domid="3",vbd="xvdb",plugin="cow over file""#;
        for want in [
            format!("xen_disk_requests_total{{{l},op=\"read\"}} 7"),
            format!("xen_disk_requests_total{{{l},op=\"write\"}} 2"),
            format!("xen_disk_bytes_total{{{l},op=\"read\"}} 28672"),
            format!("xen_disk_request_duration_seconds_bucket{{{l},le=\"0.00001\"}} 1"),
            format!("xen_disk_request_duration_seconds_bucket{{{l},le=\"0.001\"}} 2"),
            format!("xen_disk_request_duration_seconds_bucket{{{l},le=\"+Inf\"}} 3"),
            format!("xen_disk_request_duration_seconds_count{{{l}}} 3"),
            format!("xen_disk_limit_iops{{{l},dir=\"read\"}} 500"),
            format!("xen_disk_size_bytes{{{l}}} 1048576"),
            "xen_disk_devices 1".to_string(),
            "# TYPE xen_disk_request_duration_seconds histogram".to_string(),
        ] {
            assert!(text.lines().any(|x| x == want), "missing {want}:\n{text}");
        }
        // Every sample line is a name, optional labels, and a number; every family typed once.
        let mut typed = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                assert!(
                    typed.insert(rest.split(' ').next().unwrap().to_string()),
                    "{line}"
                );
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
        assert!(typed.contains("process_cpu_seconds_total"), "{text}");
    }
}
