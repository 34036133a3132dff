//! `scripts/ceph-sets.sh`, which gathers the README's `ceph-rbd` sets: a fresh one-node
//! cluster per pattern (the lab script `tests/ceph-lab/ceph-one-node.sh`), pairs of the
//! plugin against the fair librbd reference through `scripts/pairs.sh`, and the cluster
//! stopped at the end. Needs Ceph's packages (`.ci/run` installs them); the monitor's port is
//! fixed, so this binary runs one cluster at a time, as `tests/ceph_rbd.rs` does.

mod common;
use common::*;
use std::path::Path;
use std::process::{Command, Output};

fn sets(args: &[&str], dir: Option<&Path>) -> Output {
    build_all();
    let mut c = Command::new("bash");
    c.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ceph-sets.sh"))
        .args(args)
        .env("XEN_DISK_HOST", target_dir().join("xen-disk-host"))
        .env("XEN_DISK_PLUGIN_PATH", target_dir())
        .env("SETS_SECONDS", "0.3")
        .env("SETS_IMAGE", "64M");
    if let Some(d) = dir {
        c.env("SETS_DIR", d);
    }
    c.output().expect("bash")
}

#[test]
fn ceph_sets_refuses_a_bad_count_or_pattern_before_starting_a_cluster() {
    for (args, needle) in [
        (&["0"][..], "usage"),
        (&["x"][..], "usage"),
        (&["2", "bogus:4k"][..], "pattern bogus:4k"),
        (&["2", "read:"][..], "pattern read:"),
        (&["2", "read:4q"][..], "block size"),
    ] {
        let o = sets(args, None);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
        assert!(stdout(&o).is_empty(), "{args:?}: {}", stdout(&o));
    }
}

/// The figure after `word` in `line` ("plugin 23920 iops" -> 23920).
fn after(line: &str, word: &str) -> f64 {
    let w: Vec<&str> = line
        .split([' ', ',', ';'])
        .filter(|w| !w.is_empty())
        .collect();
    let i = w.iter().position(|x| *x == word).unwrap_or_else(|| {
        panic!("no {word:?} in {line:?}");
    });
    w[i + 1]
        .parse()
        .unwrap_or_else(|_| panic!("{word} in {line:?}"))
}

#[test]
fn ceph_sets_runs_each_pattern_on_its_own_cluster_and_stops_it() {
    for tool in ["ceph-mon", "ceph-osd", "ceph-mgr", "rbd"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(found, "{tool} is not installed (.ci/run installs Ceph)");
    }
    let dir = TempDir::new("ceph-sets");
    let o = sets(
        &["1", "randread:4k", "write:1M", "--", "--submit"],
        Some(&dir.0),
    );
    let out = stdout(&o);
    assert!(o.status.success(), "{out}{}", stderr(&o));
    let lines: Vec<&str> = out.lines().collect();
    for (rw, bs) in [("randread", "4k"), ("write", "1M")] {
        let head = lines
            .iter()
            .position(|l| *l == format!("== {rw} {bs}"))
            .unwrap_or_else(|| panic!("no set for {rw} {bs}:\n{out}"));
        // Only the counted pair is printed: the uncounted first one is not.
        let pair = lines[head + 1];
        assert!(pair.starts_with("pair 1: "), "{out}");
        let (p, r) = (after(pair, "plugin"), after(pair, "rbd-fair"));
        assert!(p > 0.0 && r > 0.0, "{pair}");
        assert!((after(pair, "ratio") - p / r).abs() < 0.001, "{pair}");
        assert!(lines[head + 2].starts_with("median ratio "), "{out}");
        assert!(!lines[head + 2 + 1..]
            .iter()
            .take_while(|l| !l.starts_with("=="))
            .any(|l| l.starts_with("pair 2")));
        // The extra arguments reach every run: `--submit` has no simulated guest.
        let cpu = lines[head + 1..]
            .iter()
            .find(|l| l.starts_with("median cpu per request"))
            .unwrap_or_else(|| panic!("no cpu line:\n{out}"));
        assert!(
            cpu.contains("client side") && !cpu.contains("guest"),
            "{cpu}"
        );
        let summary = lines
            .iter()
            .find(|l| l.starts_with(&format!("{rw} {bs}: median ")))
            .unwrap_or_else(|| panic!("no summary for {rw} {bs}:\n{out}"));
        assert!(after(summary, "median") > 0.0, "{summary}");
    }
    // The last cluster is stopped: no process runs with its configuration any more.
    let conf = dir.join("c/ceph.conf").display().to_string();
    let running: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&conf))
        .collect();
    assert!(running.is_empty(), "still running: {running:?}");
}
