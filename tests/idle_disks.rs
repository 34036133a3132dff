//! Idle disks cost no threads and no wake-ups of their own: `serve --sim` with sixteen
//! connected disks whose guests have stopped doing I/O. Their rings give their threads up
//! (parked: none left, each ring counts a park, no ring counts a sleep afterwards), their
//! devices share the daemon's few device loops, which wake a few times a second in all,
//! and the devices share the daemon's one xenstore connection. Counts, not times: a thread
//! per disk, or a timer per ring, would show however fast the machine is.

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Context switches of each of `pid`'s threads whose name starts with `prefix`.
fn switches(pid: u32, prefix: &str) -> Vec<(u32, u64)> {
    counted(
        pid,
        prefix,
        &["voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"],
    )
}

/// Times each of `pid`'s threads whose name starts with `prefix` went to sleep: its voluntary
/// switches. (A yield while spinning before a wait, as channel libraries do, counts as
/// involuntary, and is no wake-up.)
fn sleeps_of(pid: u32, prefix: &str) -> Vec<(u32, u64)> {
    counted(pid, prefix, &["voluntary_ctxt_switches"])
}

/// The sum of the `/proc` status lines `keys` of each of `pid`'s threads named `prefix`...
fn counted(pid: u32, prefix: &str, keys: &[&str]) -> Vec<(u32, u64)> {
    let all = threads(pid);
    // A process that exited has no threads to count, and nothing to prove.
    assert!(!all.is_empty(), "process {pid} is gone");
    all.into_iter()
        .filter(|t| t.comm.starts_with(prefix))
        .map(|t| {
            let n = keys.iter().filter_map(|k| t.status_number(k)).sum();
            (t.tid, n)
        })
        .collect()
}

#[test]
fn idle_disks_hold_no_threads_of_their_own_and_are_never_woken() {
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
    let stats = |dev: &str, key: &str| {
        let o = host(&[
            "ctl",
            "--socket",
            control.to_str().unwrap(),
            "stats",
            dev,
            "--json",
        ]);
        assert!(o.status.success(), "ctl stats {dev}: {}", stderr(&o));
        json_number(&stdout(&o), key)
    };
    let check = || -> Result<(), String> {
        if connected < 16 {
            return Err(format!("only {connected} of 16 disks connected"));
        }
        // Let the guests' connect-time reads finish and every ring park (after 5 idle s).
        let settle = Instant::now() + Duration::from_secs(60);
        loop {
            let rings = switches(pid, "xen-disk-ring");
            if rings.is_empty() {
                break;
            }
            if Instant::now() > settle {
                return Err(format!("rings still hold threads after 60 s: {rings:?}"));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let parks = |dev: &str| stats(dev, "parks");
        for dev in ["1/xvdb", "2/xvdi"] {
            if parks(dev) < 1.0 {
                return Err(format!(
                    "{dev}: no park counted, yet no ring thread is left"
                ));
            }
        }
        let sleeps = [stats("1/xvdb", "sleeps"), stats("2/xvdi", "sleeps")];
        // No thread per disk: the devices run on the daemon's fixed loops.
        let loops = sleeps_of(pid, "xen-disk-devic");
        if loops.len() != 4 || !switches(pid, "xen-disk-dev-").is_empty() {
            return Err(format!(
                "{} device loops for 16 disks (want 4), {} device threads (want none)",
                loops.len(),
                switches(pid, "xen-disk-dev-").len()
            ));
        }
        let woken = |a: &[(u32, u64)], b: &[(u32, u64)]| -> u64 {
            b.iter().map(|x| x.1).sum::<u64>() - a.iter().map(|x| x.1).sum::<u64>()
        };
        std::thread::sleep(Duration::from_secs(3));
        let after = switches(pid, "xen-disk-ring");
        if !after.is_empty() {
            return Err(format!("idle rings took threads again: {after:?}"));
        }
        let again = [stats("1/xvdb", "sleeps"), stats("2/xvdi", "sleeps")];
        if again != sleeps {
            return Err(format!(
                "idle rings counted sleeps: {sleeps:?} -> {again:?}"
            ));
        }
        // Each idle device looks at its flags once a second, and the loops take the looks
        // that fall together in one wake-up: at most one per disk per second (about one per
        // loop per second, in fact). A device left at its busy pace (every 100 ms) would
        // wake them hundreds of times.
        let loops_after = sleeps_of(pid, "xen-disk-devic");
        let n = woken(&loops, &loops_after);
        if n > 48 {
            return Err(format!(
                "the device loops woke {n} times in 3 idle s for 16 disks"
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
