//! The same-boot A/B's checks (`tests/xen-lab/bench.sh --checks-only LOG`) without booting
//! the lab: a real bench boot's log passes and prints the whole table, and the same log with
//! a run missing, a run that failed, or a disk that never connected fails. The checks are
//! about completeness, never speed: the table's ratios do not decide a pass.

mod common;
use common::{lab_check_fails, lab_checks, lab_log};

fn passing_log() -> String {
    lab_log("bench-pass.log")
}

/// `bench.sh --checks-only` on `log`: whether it passed, and its stdout.
fn checks(log: &str) -> (bool, String) {
    lab_checks("bench.sh", log)
}

/// The log without its lines starting with `from`, or with each replaced by `to`.
fn with(log: &str, from: &str, to: Option<&str>) -> String {
    let mut hits = 0;
    let mut out = Vec::new();
    for l in log.lines() {
        if l.starts_with(from) {
            hits += 1;
            out.extend(to.map(|t| t.to_string()));
        } else {
            out.push(l.to_string());
        }
    }
    assert!(hits >= 1, "the passing log has no line starting {from:?}");
    out.join("\n") + "\n"
}

fn fails(log: &str, check: &str) {
    lab_check_fails("bench.sh", log, check)
}

#[test]
fn a_passing_boot_passes_and_prints_every_pair_and_median() {
    let (ok, out) = checks(&passing_log());
    assert!(ok, "{out}");
    assert!(!out.contains("FAIL"), "{out}");
    for workload in [
        "4k randread d32 (IOPS), 128 MiB image",
        "4k randwrite d32 (IOPS), 128 MiB image",
        "1M seqread d8 (MB/s), 128 MiB image",
        "1M seqwrite d8 (MB/s), 128 MiB image",
        "4k randread d32 (IOPS), no storage",
    ] {
        let at = out
            .find(workload)
            .unwrap_or_else(|| panic!("no {workload}: {out}"));
        let block: Vec<&str> = out[at..].lines().take(9).collect();
        // A header, five pairs, the median and the per-request costs.
        for p in 1..=5 {
            assert!(
                block
                    .iter()
                    .any(|l| l.trim_start().starts_with(&format!("{p} "))),
                "{workload}: no pair {p}: {block:?}"
            );
        }
        assert!(
            block.iter().any(|l| l.contains("median ours/kernel")),
            "{block:?}"
        );
        assert!(
            block.iter().any(|l| l.contains("per request, median")),
            "{block:?}"
        );
    }
    for keys in [
        "kernel/loop",
        "ours/file",
        "kernel/null_blk",
        "ours/discard",
    ] {
        assert!(
            out.lines()
                .any(|l| l.starts_with("keys ") && l.contains(keys) && l.contains("fe-queues=")),
            "no keys of {keys}: {out}"
        );
    }
    assert!(out.contains("system calls of ours"), "{out}");
}

#[test]
fn a_missing_run_fails_its_workload() {
    let log = passing_log();
    fails(
        &with(&log, "GUEST: bench result file.rw.3.ours ", None),
        "file rw: every run of 5 pairs there",
    );
    fails(
        &with(&log, "LAB: mark null.rr.2.kernel begin ", None),
        "null rr: every run of 5 pairs there",
    );
}

#[test]
fn a_failed_or_empty_run_fails() {
    let log = passing_log();
    let line = log
        .lines()
        .find(|l| l.starts_with("GUEST: bench result file.sr.4.kernel "))
        .unwrap()
        .replace(" rc=0 ", " rc=5 ");
    fails(
        &with(&log, "GUEST: bench result file.sr.4.kernel ", Some(&line)),
        "file sr: every run exited 0 with requests served",
    );
    let line = log
        .lines()
        .find(|l| l.starts_with("GUEST: bench result file.sw.1.ours "))
        .unwrap();
    // Nothing moved: no bytes.
    let kb = line.split(' ').find(|w| w.starts_with("kb=")).unwrap();
    let line = line.replace(kb, "kb=0");
    fails(
        &with(&log, "GUEST: bench result file.sw.1.ours ", Some(&line)),
        "file sw: every run exited 0 with requests served",
    );
}

#[test]
fn a_disk_that_never_connected_or_a_timeout_fails() {
    let log = passing_log();
    let line = log
        .lines()
        .find(|l| l.starts_with("LAB: bench keys 51776 "))
        .unwrap()
        .replace("state=4", "state=2");
    fails(
        &with(&log, "LAB: bench keys 51776 ", Some(&line)),
        "disk 51776 connected (state 4)",
    );
    let log = with(
        &log,
        "GUEST: bench finished",
        Some("LAB: timeout waiting for 'GUEST: done'"),
    );
    fails(&log, "dom0: no wait timed out");
}

/// Ten pairs or more: the table counts pairs as numbers (compared as text, "2" > "10", it
/// printed the first pair alone), so pairs the log lacks show as missing up to the tenth.
#[test]
fn a_boot_of_ten_pairs_prints_ten_rows_per_workload() {
    let log = passing_log();
    let conf = log
        .lines()
        .find(|l| l.starts_with("LAB: bench conf "))
        .expect("the passing log has its conf line");
    let log = with(
        &log,
        "LAB: bench conf ",
        Some(&conf.replace("pairs=5", "pairs=10")),
    );
    let (ok, out) = checks(&log);
    assert!(!ok, "five pairs of ten passed: {out}");
    let at = out
        .find("4k randread d32 (IOPS), 128 MiB image")
        .expect("{out}");
    let block: Vec<&str> = out[at..].lines().take(13).collect();
    for p in 1..=5 {
        assert!(
            block
                .iter()
                .any(|l| l.trim_start().starts_with(&format!("{p} ")) && !l.contains("missing")),
            "no pair {p}: {block:?}"
        );
    }
    for p in 6..=10 {
        assert!(
            block
                .iter()
                .any(|l| l.trim_start() == format!("{p}  (missing)")),
            "pair {p} not shown missing: {block:?}"
        );
    }
}
