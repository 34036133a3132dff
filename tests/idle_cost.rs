//! What idle disks cost dom0: once every guest has connected and stopped doing I/O, the
//! daemon neither asks xenstore anything nor wakes its ring threads, whatever the number of
//! disks. Counted (by the daemon's own metrics), not timed: a loaded machine only lowers the
//! counts, while a daemon that polls (as it did, ten times a second per disk and per ring)
//! multiplies them by the number of disks.

mod common;
use common::*;
use std::time::{Duration, Instant};

const DOMAINS: usize = 6;
const DISKS_PER_DOMAIN: usize = 4;
const DISKS: u64 = (DOMAINS * DISKS_PER_DOMAIN) as u64;

/// A family's total in a Prometheus text exposition: its samples summed, labelled or not.
fn counter(body: &str, name: &str) -> u64 {
    let values: Vec<u64> = body
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = match rest.strip_prefix('{') {
                Some(labelled) => labelled.split_once("} ")?.1,
                None => rest.strip_prefix(' ')?,
            };
            value.trim().parse().ok()
        })
        .collect();
    assert!(!values.is_empty(), "no {name} in the metrics:\n{body}");
    values.iter().sum()
}

#[test]
fn idle_disks_cost_no_xenstore_requests_and_no_ring_wakeups() {
    let dir = TempDir::new("idle-cost");
    let mut toml = String::new();
    for d in 0..DOMAINS {
        for v in 0..DISKS_PER_DOMAIN {
            let vbd = (b'b' + v as u8) as char;
            toml.push_str(&format!(
                "[[disk]]\ndomain = \"idle{d}\"\nplugin = \"discard\"\nvbd = \"xvd{vbd}\"\n\
                 [disk.plugin-config]\nsize = \"16M\"\n\n"
            ));
        }
    }
    let config = dir.join("disks.toml");
    std::fs::write(&config, toml).unwrap();
    let mut serve = Running::host(&[
        "serve",
        "--sim",
        "--config",
        config.to_str().unwrap(),
        "--metrics",
        "127.0.0.1:0",
    ]);
    let addr = serve.metrics_addr();
    for d in 1..=DOMAINS {
        for v in 0..DISKS_PER_DOMAIN {
            // Linux's xvdb.. numbering: 202 << 8 | index << 4.
            let devid = (202 << 8) | ((1 + v) << 4);
            serve.expect(&format!(
                "simulated guest {d} connected /local/domain/{d}/device/vbd/{devid}"
            ));
        }
    }
    let scrape = || {
        let (status, body) = http_get(&addr, "/metrics");
        assert!(status.contains("200"), "{status}");
        (
            counter(&body, "xen_disk_xenstore_requests_total"),
            counter(&body, "xen_disk_ring_sleeps_total"),
            counter(&body, "xen_disk_devices"),
        )
    };
    // Let the devices' last handshake steps and the guests' first reads finish: no ring
    // wakeup for 2 s. (A fixed 2 s was too short on a loaded machine, where connecting 24
    // disks takes half a minute.)
    let settle = Instant::now() + Duration::from_secs(60);
    let mut last = scrape();
    let mut quiet = 0;
    while quiet < 2 {
        std::thread::sleep(Duration::from_secs(1));
        let now = scrape();
        quiet = if now.1 == last.1 { quiet + 1 } else { 0 };
        assert!(
            Instant::now() < settle,
            "rings still waking after 60 s: {last:?} -> {now:?}"
        );
        last = now;
    }
    let (xs0, wake0, devices) = scrape();
    assert_eq!(devices, DISKS);
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(5));
    let (xs1, wake1, _) = scrape();
    let window = started.elapsed().as_secs() + 1;
    let (requests, wakeups) = (xs1 - xs0, wake1 - wake0);
    eprintln!(
        "{DISKS} idle disks over {window} s: {requests} xenstore requests, {wakeups} ring wakeups"
    );
    // About one look for new domains and toolstack devices (a directory per domain) every
    // 5 s; polling devices made forty requests per disk a second.
    assert!(
        requests <= 2 * (DOMAINS as u64 + 1) * window.div_ceil(5),
        "{requests} xenstore requests in {window} s from {DISKS} idle disks"
    );
    // Idle rings sleep with no timer; polling rings woke ten times a second. (The bound
    // leaves room for a one-second safety net, should one come back.)
    assert!(
        wakeups <= 2 * DISKS * window,
        "{wakeups} ring wakeups in {window} s from {DISKS} idle disks"
    );
}
