//! The package scenario's checks (`tests/xen-lab/package-run.sh --checks-only LOG`) without
//! booting the lab: a real passing boot's log passes, and the same log with one step failed
//! makes that step's check FAIL.

mod common;
use common::{lab_check_fails, lab_checks, lab_log};

fn passing_log() -> String {
    lab_log("package-pass.log")
}

/// `package-run.sh --checks-only` on `log`: whether it passed, and its stdout.
fn checks(log: &str) -> (bool, String) {
    lab_checks("package-run.sh", log)
}

/// The log with its one line starting `from` replaced by `to` (lines, possibly none).
fn with(log: &str, from: &str, to: &[&str]) -> String {
    let mut hits = 0;
    let mut out = Vec::new();
    for l in log.lines() {
        if l.starts_with(from) {
            hits += 1;
            out.extend(to.iter().map(|s| s.to_string()));
        } else {
            out.push(l.to_string());
        }
    }
    assert_eq!(
        hits, 1,
        "the passing log has no single line starting {from:?}"
    );
    out.join("\n") + "\n"
}

fn fails(log: &str, check: &str) {
    lab_check_fails("package-run.sh", log, check)
}

#[test]
fn a_passing_boot_passes_every_check() {
    let (ok, out) = checks(&passing_log());
    assert!(ok, "{out}");
    assert!(!out.contains("FAIL"), "{out}");
    assert!(
        out.ends_with("xen-lab package: 22 passed, 0 failed\n"),
        "{out}"
    );
}

#[test]
fn a_run_from_target_instead_of_the_package_fails() {
    let log = passing_log();
    let line = log
        .lines()
        .find(|l| l.starts_with("LAB: pkg from-package="))
        .unwrap()
        .replace("from-package=yes", "from-package=no");
    fails(
        &with(&log, "LAB: pkg from-package=", &[&line]),
        "installed from the package",
    );
}

#[test]
fn bytes_that_differ_fail_their_check() {
    let log = passing_log();
    fails(
        &with(
            &log,
            "LAB: b host-md5-written=",
            &["LAB: b host-md5-written=00000000000000000000000000000000"],
        ),
        "and is in dom0's image",
    );
    fails(
        &with(
            &log,
            "LAB: c host-md5=",
            &["LAB: c host-md5=00000000000000000000000000000000"],
        ),
        "ExecReload: the guest reads dom0's bytes",
    );
}

#[test]
fn a_reload_that_adds_nothing_fails_even_when_dom0_quotes_the_line() {
    let log = passing_log();
    let log = with(&log, "GUEST: xvdc size=", &[]);
    let log = with(
        &log,
        "GUEST: disks done",
        &[
            "LAB: timeout waiting for 'GUEST: disks done'",
            "LAB: console GUEST: xvdc size=32768 ro=1",
        ],
    );
    fails(&log, "dom0: every wait saw its guest line");
    fails(&log, "ExecReload: the added disk reaches the guest");
}

#[test]
fn a_stop_that_detaches_or_a_start_that_does_not_take_over_fails() {
    let log = passing_log();
    fails(
        &with(
            &log,
            "LAB: stopped entries-left=",
            &["LAB: stopped entries-left=no states=,,"],
        ),
        "ExecStop: a hand-over, both disks left connected",
    );
    fails(
        &with(
            &log,
            "LAB: restarted taken-over=",
            &["LAB: restarted taken-over=1"],
        ),
        "ExecStart again: the new serve takes both disks over",
    );
    fails(
        &with(&log, "GUEST: io-errors=", &["GUEST: io-errors=yes"]),
        "no I/O error in the guest's kernel log",
    );
}

#[test]
fn a_stop_that_fails_or_leaves_entries_fails() {
    let log = passing_log();
    fails(
        &with(&log, "LAB: serve exit=", &["LAB: serve exit=143"]),
        "ExecStop: serve exits 0",
    );
    fails(
        &with(
            &log,
            "LAB: serve entries-left=",
            &["LAB: serve entries-left=yes"],
        ),
        "serve removed its backend entries",
    );
    fails(
        &with(&log, "GUEST: xvdc gone", &["GUEST: xvdc still there"]),
        "the guest lets go of both disks",
    );
}
