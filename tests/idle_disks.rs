//! Idle disks cost no wake-ups on their rings: `serve --sim` with sixteen connected disks
//! whose guests have stopped doing I/O; over a few idle seconds no ring thread is switched
//! in (its context switches, from /proc, stay as they were) and no ring counts a sleep
//! (`ctl stats`). Counts, not times: a ring thread with a timer would add switches however
//! fast the machine is. The devices share the daemon's one xenstore connection.

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Context switches of each of `pid`'s threads whose name starts with `prefix`.
fn switches(pid: u32, prefix: &str) -> Vec<(u32, u64)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        let comm = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) {
            continue;
        }
        let status = std::fs::read_to_string(t.join("status")).unwrap_or_default();
        let n: u64 = status
            .lines()
            .filter(|l| l.contains("ctxt_switches"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        let tid = t.file_name().unwrap().to_str().unwrap().parse().unwrap();
        out.push((tid, n));
    }
    out.sort();
    out
}

#[test]
fn idle_rings_are_never_woken() {
    build_all();
    let t = TempDir::new("idle");
    let mut config = String::new();
    for guest in ["a", "b"] {
        for vbd in [
            "xvdb", "xvdc", "xvdd", "xvde", "xvdf", "xvdg", "xvdh", "xvdi",
        ] {
            config.push_str(&format!(
                "[[disk]]\ndomain = \"{guest}\"\nplugin = \"discard\"\nvbd = \"{vbd}\"\n[disk.plugin-config]\nsize = \"16M\"\n\n"
            ));
        }
    }
    let path = t.join("disks.toml");
    std::fs::write(&path, config).unwrap();
    let control = t.join("control.sock");
    let mut child = Command::new(target_dir().join("xen-disk-host"))
        .args(["serve", "--sim", "--config", path.to_str().unwrap()])
        .args(["--xenstore-socket", t.join("xs.sock").to_str().unwrap()])
        .args(["--control", control.to_str().unwrap()])
        .env("XEN_DISK_PLUGIN_PATH", target_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run xen-disk-host serve");
    let pid = child.id();
    let lines = BufReader::new(child.stdout.take().unwrap());
    let mut connected = 0;
    for line in lines.lines().map_while(Result::ok) {
        if line.contains(" connected /local/domain/") {
            connected += 1;
            if connected == 16 {
                break;
            }
        }
    }
    let stats = |dev: &str| {
        let o = host(&[
            "ctl",
            "--socket",
            control.to_str().unwrap(),
            "stats",
            dev,
            "--json",
        ]);
        assert!(o.status.success(), "ctl stats {dev}: {}", stderr(&o));
        json_number(&stdout(&o), "sleeps")
    };
    let check = || -> Result<(), String> {
        if connected < 16 {
            return Err(format!("only {connected} of 16 disks connected"));
        }
        // Let the guests' connect-time reads finish and every ring go to sleep: no switch
        // for 2 s (half a second of quiet can be a loaded machine's pause between two of a
        // guest's reads).
        let settle = Instant::now() + Duration::from_secs(60);
        let mut before = switches(pid, "xen-disk-ring");
        let mut quiet = 0;
        while quiet < 4 {
            std::thread::sleep(Duration::from_millis(500));
            let now = switches(pid, "xen-disk-ring");
            quiet = if now == before { quiet + 1 } else { 0 };
            if Instant::now() > settle {
                return Err(format!("rings still busy after 60 s: {now:?}"));
            }
            before = now;
        }
        if before.len() != 16 {
            return Err(format!(
                "{} ring threads for 16 one-queue disks",
                before.len()
            ));
        }
        let sleeps = [stats("1/xvdb"), stats("2/xvdi")];
        std::thread::sleep(Duration::from_secs(3));
        let after = switches(pid, "xen-disk-ring");
        if after != before {
            return Err(format!(
                "idle ring threads were woken: {before:?} -> {after:?}"
            ));
        }
        let again = [stats("1/xvdb"), stats("2/xvdi")];
        if again != sleeps {
            return Err(format!(
                "idle rings counted sleeps: {sleeps:?} -> {again:?}"
            ));
        }
        // One xenstore connection for the daemon and all 16 devices; the two simulated
        // guests (in this process too) have one each.
        let readers = switches(pid, "xenstore-reader").len();
        if readers != 3 {
            return Err(format!(
                "{readers} xenstore connections for 16 disks of 2 simulated guests (want 1 + 2)"
            ));
        }
        Ok(())
    };
    let result = check();
    let _ = child.kill();
    let _ = child.wait();
    result.unwrap();
}
