//! Operating a host (issue 25): a real Prometheus server scrapes `serve --metrics` while two
//! simulated guests do I/O and gets the request counts `ctl stats` reports; a guest whose
//! disk has a limit gets its limit and no more, its neighbour without one far more, and
//! neither sees a failed request; `connect --sim` answers `ctl` (list --json, limit) and
//! serves metrics.
//!
//! Prometheus comes from Debian's `prometheus` package (.ci/run installs it); it runs on
//! loopback with a temporary configuration and storage.

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `query` percent-encoded for a URL's query string.
fn url_encode(query: &str) -> String {
    query
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `xen-disk-host ctl --socket SOCKET ARGS`: its stdout (the command must succeed).
fn ctl(socket: &Path, args: &[&str]) -> String {
    let mut all = vec!["ctl", "--socket", socket.to_str().unwrap()];
    all.extend(args);
    let o = host(&all);
    assert!(o.status.success(), "ctl {args:?}: {}", stderr(&o));
    stdout(&o)
}

/// A device's totals from `ctl stats <dev> --json`.
fn stats(socket: &Path, dev: &str) -> (u64, u64, u64) {
    let out = ctl(socket, &["stats", dev, "--json"]);
    let n = |k| json_number(&out, k) as u64;
    (n("reads"), n("writes"), n("errors"))
}

/// Waits until the simulated I/O has ended: both devices' counts still for a second.
fn wait_for_quiet(socket: &Path, devs: &[&str]) -> Vec<(u64, u64, u64)> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last: Vec<_> = devs.iter().map(|d| stats(socket, d)).collect();
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now: Vec<_> = devs.iter().map(|d| stats(socket, d)).collect();
        if now == last && now.iter().all(|s| s.0 > 0) {
            return now;
        }
        assert!(Instant::now() < deadline, "I/O never settled: {now:?}");
        last = now;
    }
}

/// Two guests on one `serve --sim`, `alpha` limited to `read_iops` reads a second, `beta`
/// not, both kept busy for `seconds`.
fn two_guests(dir: &TempDir, read_iops: u32, seconds: &str, extra: &[&str]) -> (Running, PathBuf) {
    for name in ["a.img", "b.img"] {
        std::fs::File::create(dir.join(name))
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
    }
    let config = dir.join("disks.toml");
    std::fs::write(
        &config,
        format!(
            "[[disk]]\ndomain = \"alpha\"\nplugin = \"file\"\nvbd = \"xvdb\"\n\
             [disk.limits]\nread-iops = {read_iops}\n\
             [disk.plugin-config]\npath = \"{}\"\n\n\
             [[disk]]\ndomain = \"beta\"\nplugin = \"file\"\nvbd = \"xvdb\"\n\
             [disk.plugin-config]\npath = \"{}\"\n",
            dir.join("a.img").display(),
            dir.join("b.img").display()
        ),
    )
    .unwrap();
    let socket = dir.join("control.sock");
    let mut args = vec![
        "serve",
        "--sim",
        "--config",
        config.to_str().unwrap(),
        "--control",
        socket.to_str().unwrap(),
        "--sim-io",
        seconds,
        "--xenstore-socket",
    ];
    let xs = dir.join("xenstored.sock");
    args.push(xs.to_str().unwrap());
    args.extend(extra);
    let mut serve = Running::host(&args);
    serve.expect("simulated guest 1 connected");
    serve.expect("simulated guest 2 connected");
    (serve, socket)
}

/// A free loopback port (bound, read, let go).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The single value of an instant-vector answer from Prometheus' HTTP API, if there is one.
fn single_value(body: &str) -> Option<u64> {
    // {"status":"success","data":{"resultType":"vector","result":[{"metric":{...},"value":[1.7e9,"123"]}]}}
    let at = body.find("\"value\":[")?;
    let rest = &body[at..];
    let v = rest.split('"').nth(3)?;
    (body.matches("\"value\":[").count() == 1).then_some(())?;
    v.parse().ok()
}

#[test]
fn prometheus_scrapes_the_request_counts_ctl_stats_reports() {
    let dir = TempDir::new("prometheus");
    let (mut serve, socket) = two_guests(&dir, 300, "3", &["--metrics", "127.0.0.1:0"]);
    let target = serve.metrics_addr();
    // A real Prometheus server, on loopback, scraping every second during the guests' I/O.
    let web = format!("127.0.0.1:{}", free_port());
    let prom_config = dir.join("prometheus.yml");
    std::fs::write(
        &prom_config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: xen-disk\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let data = dir.join("tsdb");
    let mut prom = Command::new("prometheus");
    prom.arg(format!("--config.file={}", prom_config.display()))
        .arg(format!("--storage.tsdb.path={}", data.display()))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _prom = Running::from_child(
        prom.spawn()
            .expect("run prometheus (Debian package `prometheus`)"),
    );
    // A scrape while the guests are busy: the target is up.
    let query = |q: &str| {
        let (status, body) = http_get(&web, &format!("/api/v1/query?query={}", url_encode(q)));
        (status, body)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let up = TcpStream::connect(&web)
            .ok()
            .map(|_| query("up{job=\"xen-disk\"}"));
        if let Some((_, body)) = &up {
            if single_value(body) == Some(1) {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never scraped: {up:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (reads_a, writes_a, _) = stats(&socket, "1/xvdb");
    assert!(reads_a > 0, "alpha did no I/O yet");
    // The I/O ends; then Prometheus' latest sample must be what ctl stats says.
    let settled = wait_for_quiet(&socket, &["1/xvdb", "2/xvdb"]);
    for (domain, (reads, writes, _)) in ["alpha", "beta"].iter().zip(&settled) {
        for (op, want) in [("read", reads), ("write", writes)] {
            let q = format!("xen_disk_requests_total{{domain=\"{domain}\",op=\"{op}\"}}");
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let (status, body) = query(&q);
                assert!(status.contains("200"), "{q}: {status} {body}");
                if single_value(&body) == Some(*want) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{q}: Prometheus says {body}, ctl stats {want}"
                );
                std::thread::sleep(Duration::from_millis(250));
            }
        }
    }
    // The families an operator graphs are there, with their labels.
    let (_, body) =
        query("xen_disk_request_duration_seconds_count{vbd=\"xvdb\",domid=\"2\",plugin=\"file\"}");
    assert!(single_value(&body).is_some_and(|n| n > 0), "{body}");
    let (_, body) = query("xen_disk_limit_iops{domain=\"alpha\",dir=\"read\"}");
    assert_eq!(single_value(&body), Some(300), "{body}");
    let (_, body) = query("xen_disk_attaches_total");
    assert_eq!(single_value(&body), Some(2), "{body}");
    let (_, body) = query("process_open_fds{job=\"xen-disk\"}");
    assert!(single_value(&body).is_some_and(|n| n > 0), "{body}");
    // Still the same figures as when first seen moving: counters only grow.
    assert!(settled[0].0 >= reads_a && settled[0].1 >= writes_a);
}

#[test]
fn a_limited_guest_gets_its_limit_and_its_neighbour_full_speed() {
    let dir = TempDir::new("limits");
    let started = Instant::now();
    // A simulated guest does one request at a time, so its speed is the round trip's: on a
    // loaded machine (both cores busy) an unlimited guest managed about 30 reads a second,
    // and alpha at a 200/s limit read only 96 in 3 s. A rate well under that keeps the
    // limiter, not the machine, what holds alpha back.
    let rate = 5u64;
    let (_serve, socket) = two_guests(&dir, rate as u32, "3", &[]);
    let settled = wait_for_quiet(&socket, &["1/xvdb", "2/xvdb"]);
    // The limiter started with the daemon: however slow this machine, alpha cannot have read
    // more than its rate over the daemon's whole life plus its burst (a tenth of a second's,
    // at least one).
    let life = started.elapsed().as_secs_f64();
    let (alpha, beta) = (settled[0], settled[1]);
    eprintln!("alpha {alpha:?}, beta {beta:?} (reads, writes, errors) in {life:.1} s");
    let most = (rate as f64 * life) as u64 + (rate / 10).max(1) + 1;
    assert!(
        alpha.0 <= most,
        "alpha read {} > {most} in {life:.1} s",
        alpha.0
    );
    // It got its limit, roughly, over the 3 s of I/O (loosely: this machine may be busy).
    assert!(alpha.0 >= rate * 3 / 2, "alpha read only {}", alpha.0);
    // Over the limit, requests waited; none failed.
    assert_eq!((alpha.2, beta.2), (0, 0), "errors");
    // Its writes were not limited, but the guest reads before it writes: they follow (the
    // reads also count the guest's first scan).
    assert!(alpha.1 <= alpha.0 && alpha.1 > 0, "{alpha:?}");
    // Beta, unlimited, went far faster on the same daemon (held like alpha, it would have read
    // about as much).
    assert!(
        beta.0 >= 2 * alpha.0,
        "beta {} vs alpha {}",
        beta.0,
        alpha.0
    );
}

#[test]
fn limits_change_live_through_ctl() {
    let dir = TempDir::new("ctl-limit");
    // A limit far under what a guest does even on a loaded machine (one request at a time:
    // about 30 reads a second with both cores busy, where lifting 100/s showed nothing).
    let (_serve, socket) = two_guests(&dir, 5, "30", &[]);
    assert_eq!(
        ctl(&socket, &["limit", "1/xvdb"]).trim(),
        "1/xvdb: read-iops=5/s (burst 1)"
    );
    // Lifted live: alpha runs free without detaching.
    let out = ctl(&socket, &["limit", "1/xvdb", "off"]);
    assert_eq!(out.trim(), "1/xvdb: unlimited");
    let t0 = Instant::now();
    let before = stats(&socket, "1/xvdb").0;
    std::thread::sleep(Duration::from_secs(2));
    let after = stats(&socket, "1/xvdb").0;
    // Still limited to 5/s, it could not have read more than this; free, it does.
    let limited = (5.0 * t0.elapsed().as_secs_f64()) as u64 + 1 + 2;
    assert!(
        after - before > limited,
        "{before} -> {after}: still limited?"
    );
    // Set again, tighter: the count grows by at most the new rate plus its burst.
    let out = ctl(
        &socket,
        &["limit", "1/xvdb", "read-iops=20", "read-iops-burst=5"],
    );
    assert_eq!(out.trim(), "1/xvdb: read-iops=20/s (burst 5)");
    let t0 = Instant::now();
    let before = stats(&socket, "1/xvdb").0;
    std::thread::sleep(Duration::from_secs(2));
    let after = stats(&socket, "1/xvdb").0;
    // Plus what the guest had in flight when the limit came (one request at a time).
    let most = (20.0 * t0.elapsed().as_secs_f64()) as u64 + 5 + 1 + 2;
    assert!(
        after - before <= most,
        "{before} -> {after} (at most {most})"
    );
    assert!(after > before, "alpha stalled under its limit");
    // The device list shows it, as text and JSON, and a bad key is refused by name.
    let json = ctl(&socket, &["list", "--json"]);
    assert!(json.contains("\"id\":\"1/xvdb\""), "{json}");
    assert!(
        json.contains("\"limits\":\"read-iops=20/s (burst 5)\""),
        "{json}"
    );
    let o = host(&[
        "ctl",
        "--socket",
        socket.to_str().unwrap(),
        "limit",
        "1/xvdb",
        "read-iops=fast",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("`read-iops` = fast"), "{}", stderr(&o));
    assert_eq!(
        ctl(&socket, &["limit", "1/xvdb"]).trim(),
        "1/xvdb: read-iops=20/s (burst 5)"
    );
}

#[test]
fn a_reload_changes_limits_live() {
    let dir = TempDir::new("reload-limits");
    let (mut serve, socket) = two_guests(&dir, 100, "1", &[]);
    assert_eq!(
        ctl(&socket, &["limit", "1/xvdb"]).trim(),
        "1/xvdb: read-iops=100/s (burst 10)"
    );
    // The file now limits beta's writes and lifts alpha's reads.
    let config = dir.join("disks.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replace("read-iops = 100\n", "").replacen(
        "[[disk]]\ndomain = \"beta\"\nplugin = \"file\"\nvbd = \"xvdb\"\n",
        "[[disk]]\ndomain = \"beta\"\nplugin = \"file\"\nvbd = \"xvdb\"\n[disk.limits]\nwrite-bps = \"8M\"\n",
        1,
    );
    std::fs::write(&config, text).unwrap();
    let ok = Command::new("kill")
        .args(["-HUP", &serve.child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    serve.expect("reload: 2/xvdb: limits now write-bps=8388608/s");
    serve.expect("reload: 1/xvdb: limits now unlimited");
    assert_eq!(
        ctl(&socket, &["limit", "1/xvdb"]).trim(),
        "1/xvdb: unlimited"
    );
    assert_eq!(
        ctl(&socket, &["limit", "2/xvdb"]).trim(),
        "2/xvdb: write-bps=8388608/s (burst 838860)"
    );
    // Both guests stayed connected: nothing was detached for it.
    let list = ctl(&socket, &["list"]);
    assert_eq!(list.matches("state=Connected").count(), 2, "{list}");
}

#[test]
fn connect_sim_answers_ctl_and_serves_metrics() {
    let dir = TempDir::new("connect-sim");
    let image = dir.join("d.img");
    random_file(&image, 1 << 20, 7);
    let socket = dir.join("connect.sock");
    let path = format!("path={}", image.display());
    let mut connect = Running::host(&[
        "connect",
        "1",
        "--sim",
        "--plugin",
        "file",
        "-c",
        &path,
        "--limit",
        "write-bps=1M",
        "--control",
        socket.to_str().unwrap(),
        "--metrics",
        "0",
    ]);
    let addr = connect.metrics_addr();
    assert!(
        addr.starts_with("127.0.0.1:"),
        "{addr}: loopback by default"
    );
    connect.expect("attached file to a simulated guest");
    let list = ctl(&socket, &["list"]);
    assert!(
        list.starts_with("1/xvdb domain=1 guest=sim-guest vbd=xvdb state=Connected"),
        "{list}"
    );
    let json = ctl(&socket, &["list", "--json"]);
    assert!(
        json.contains("\"limits\":\"write-bps=1048576/s (burst 104857)\""),
        "{json}"
    );
    // The metrics endpoint reads the same device list.
    let (status, body) = http_get(&addr, "/metrics");
    assert!(status.contains("200"), "{status}");
    assert!(
        body.contains("xen_disk_limit_bytes_per_second{domain=\"sim-guest\",domid=\"1\",vbd=\"xvdb\",plugin=\"file\",dir=\"write\"} 1048576"),
        "{body}"
    );
    assert!(body.contains("\nxen_disk_devices 1\n"), "{body}");
    // The guest's first reads (its partition scan) are counted the same in both.
    let reads = json_number(&ctl(&socket, &["stats", "1/xvdb", "--json"]), "reads") as u64;
    let line = format!(
        "xen_disk_requests_total{{domain=\"sim-guest\",domid=\"1\",vbd=\"xvdb\",plugin=\"file\",op=\"read\"}} {reads}"
    );
    assert!(
        http_get(&addr, "/metrics").1.lines().any(|l| l == line),
        "{line}"
    );
    // `ctl detach` ends it as Ctrl-C would.
    let out = ctl(&socket, &["detach", "1/xvdb"]);
    assert!(out.contains("detaching"), "{out}");
    connect.expect("detached");
    let status = connect.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

/// Runs `connect --sim` with stderr into a file and `env`, attaches, changes a limit,
/// detaches; returns what it logged.
fn connect_logs(dir: &TempDir, tag: &str, env: &[(&str, String)]) -> String {
    let image = dir.join(&format!("{tag}.img"));
    random_file(&image, 1 << 20, 3);
    let socket = dir.join(&format!("{tag}.sock"));
    let log = dir.join(&format!("{tag}.log"));
    let err = std::fs::File::create(&log).unwrap();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                v.replace("{log}", &log.display().to_string()),
            )
        })
        .map(|(k, v)| {
            // `{journal}` stands for the log file's device and inode, as systemd gives them.
            if v == "{journal}" {
                let k = k.to_string();
                use std::os::unix::fs::MetadataExt;
                let m = std::fs::metadata(&log).unwrap();
                (k, format!("{}:{}", m.dev(), m.ino()))
            } else {
                (k.to_string(), v.clone())
            }
        })
        .collect();
    build_all();
    let mut child = Command::new(target_dir().join("xen-disk-host"))
        .args(["connect", "1", "--sim", "--plugin", "file", "-c"])
        .arg(format!("path={}", image.display()))
        .arg("--control")
        .arg(&socket)
        .env("XEN_DISK_PLUGIN_PATH", target_dir())
        .env_remove("RUST_LOG")
        .env_remove("XEN_DISK_LOG")
        .env_remove("JOURNAL_STREAM")
        .envs(env)
        .stdout(Stdio::piped())
        .stderr(err)
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert!(first.starts_with("attached file"), "{first}");
    ctl(&socket, &["limit", "1/xvdb", "read-iops=5"]);
    ctl(&socket, &["detach", "1/xvdb"]);
    assert!(child.wait().unwrap().success());
    std::fs::read_to_string(&log).unwrap()
}

#[test]
fn lifecycle_lines_name_the_device_and_carry_journal_priorities() {
    let dir = TempDir::new("logs");
    // Under systemd: stderr is the journal's stream.
    let text = connect_logs(&dir, "journal", &[("JOURNAL_STREAM", "{journal}".into())]);
    let lines: Vec<&str> = text.lines().collect();
    for want in [
        "attached: negotiated with the guest",
        "limits now read-iops=5/s",
        "detached",
        "removed",
    ] {
        assert!(
            lines.iter().any(|l| l.contains(want)),
            "no {want:?} in:\n{text}"
        );
    }
    for l in &lines {
        assert!(
            l.starts_with("<6>") || l.starts_with("<4>") || l.starts_with("<3>"),
            "{l}"
        );
        assert!(l.contains("1/xvdb"), "a line without the device: {l}");
        assert!(!l.contains('\u{1b}'), "colour codes in the journal: {l}");
    }
    let attached = lines.iter().find(|l| l.contains("attached:")).unwrap();
    for feature in [
        "queues=1",
        "persistent_grants=true",
        "indirect_segments=",
        "flush=true",
    ] {
        assert!(attached.contains(feature), "{attached}");
    }
    // Not under systemd: no priorities; RUST_LOG=warn leaves only warnings and errors.
    let plain = connect_logs(&dir, "plain", &[]);
    assert!(
        plain.contains("attached: negotiated") && !plain.contains("<6>"),
        "{plain}"
    );
    let quiet = connect_logs(&dir, "quiet", &[("RUST_LOG", "warn".into())]);
    assert!(!quiet.contains("attached"), "{quiet}");
    // Per-request lines only when asked: none at the default level.
    assert!(
        !text.contains("refused") && !text.contains("request failed"),
        "{text}"
    );
}

#[test]
fn bench_reports_how_close_it_came_to_a_limit_and_refuses_a_bad_one() {
    let o = host(&[
        "bench",
        "discard",
        "--rw",
        "randread",
        "--bs",
        "4k",
        "--seconds",
        "1",
        "--limit",
        "read-iops=300",
        "--json",
    ]);
    let out = stdout(&o);
    assert!(o.status.success(), "{out}{}", stderr(&o));
    assert!(out.contains("\"limit\":\"read-iops\""), "{out}");
    assert_eq!(json_number(&out, "limit_value"), 300.0);
    // The bucket cannot give more than its rate plus its burst (30) over the run, however
    // fast the machine; at least a few requests always go.
    let ops = json_number(&out, "ops");
    assert!((30.0..=300.0 * 1.5 + 30.0).contains(&ops), "{out}");
    let o = host(&["bench", "discard", "--limit", "read-iops=lots"]);
    assert_bad_input(&o, &["--limit", "`read-iops` = lots"]);
    let o = host(&["bench", "discard", "--direct", "--limit", "read-iops=5"]);
    assert_bad_input(&o, &["--limit applies to the ring path"]);
}
