//! `scripts/ceph-sets.sh`, which gathers the README's `ceph-rbd` sets: a fresh one-node
//! cluster per pattern (the lab script `tests/ceph-lab/ceph-one-node.sh`), pairs of the
//! plugin against the fair librbd reference through `scripts/pairs.sh`, and the cluster
//! stopped at the end. Needs Ceph's packages (`.ci/run` installs them); the monitor's port is
//! fixed, so this binary runs one cluster at a time, as `tests/ceph_rbd.rs` does.

mod common;
use common::*;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};

/// The monitor's port is fixed: the tests that start clusters take turns.
static ONE_CLUSTER: Mutex<()> = Mutex::new(());

fn one_cluster() -> MutexGuard<'static, ()> {
    ONE_CLUSTER.lock().unwrap_or_else(|p| p.into_inner())
}

fn sets(args: &[&str], dir: Option<&Path>) -> Output {
    sets_env(args, dir, &[])
}

/// [`sets`] with more variables in the script's environment (they win over the defaults).
fn sets_env(args: &[&str], dir: Option<&Path>, env: &[(&str, &str)]) -> Output {
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
    c.envs(env.iter().copied());
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
    for (cpu, needle) in [
        ("x", "SETS_CPU=x: expected a CPU number"),
        ("1x", "SETS_CPU=1x: expected a CPU number"),
        (
            "99999",
            "SETS_CPU=99999: this process may not run on CPU 99999",
        ),
    ] {
        let o = sets_env(&["1"], None, &[("SETS_CPU", cpu)]);
        assert_eq!(o.status.code(), Some(2), "{cpu}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{cpu}: {}", stderr(&o));
        assert!(stdout(&o).is_empty(), "{cpu}: {}", stdout(&o));
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
    let _turn = one_cluster();
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

/// `SETS_CPU=0`: the cluster's daemons (every thread) and every bench run keep to CPU 0, and
/// the runs go without `--client-cpu`. A wrapper in place of `xen-disk-host` records the CPUs
/// each run may use.
#[test]
fn ceph_sets_on_one_cpu_pins_the_cluster_and_every_run() {
    let _turn = one_cluster();
    let dir = TempDir::new("ceph-sets-cpu");
    let record = dir.join("affinity");
    let wrapper = dir.join("host-wrapper");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n\
             taskset -c -p $$ | sed 's/.*: //' >> {}\n\
             echo \"$*\" >> {}.args\n\
             exec {} \"$@\"\n",
            record.display(),
            record.display(),
            target_dir().join("xen-disk-host").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let o = sets_env(
        &["1", "randread:4k"],
        Some(&dir.0),
        &[
            ("SETS_CPU", "0"),
            ("XEN_DISK_HOST", wrapper.to_str().unwrap()),
        ],
    );
    let out = stdout(&o);
    assert!(o.status.success(), "{out}{}", stderr(&o));
    // The daemons' affinity as the script read it back after pinning them.
    let placed = out
        .lines()
        .find(|l| l.starts_with("one CPU: "))
        .unwrap_or_else(|| panic!("no placement line:\n{out}"));
    for daemon in ["ceph-mon on 0,", "ceph-osd on 0,", "ceph-mgr on 0,"] {
        assert!(placed.contains(daemon), "{daemon}: {placed}");
    }
    assert!(placed.ends_with("every bench run on 0"), "{placed}");
    // Two runs (the uncounted pair and the counted one), each allowed CPU 0 only.
    let cpus = std::fs::read_to_string(&record).unwrap();
    assert_eq!(cpus.lines().collect::<Vec<_>>(), ["0", "0"], "{cpus}");
    let args = std::fs::read_to_string(format!("{}.args", record.display())).unwrap();
    assert_eq!(args.lines().count(), 2, "{args}");
    assert!(
        args.lines()
            .all(|l| !l.contains("--client-cpu") && l.contains("--rbd-bench")),
        "{args}"
    );
    assert!(out.contains("randread 4k: median "), "{out}");
}
