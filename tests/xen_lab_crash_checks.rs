//! The crash scenario's checks (`tests/xen-lab/crash-run.sh --checks-only LOG`) without
//! booting the lab: a real passing boot's log passes, and the same log with one step failed
//! makes that step's check FAIL.

mod common;
use common::{edit_lines, lab_check_fails, lab_checks, lab_log};

fn passing_log() -> String {
    lab_log("crash-pass.log")
}

/// `crash-run.sh --checks-only` on `log`: whether it passed, and its stdout.
fn checks(log: &str) -> (bool, String) {
    lab_checks("crash-run.sh", log)
}

/// The log with each line starting `from` changed by `edit` (at least one must).
fn with(log: &str, from: &str, edit: &dyn Fn(&str) -> Option<String>) -> String {
    edit_lines(log, from, edit)
}

fn fails(log: &str, check: &str) {
    lab_check_fails("crash-run.sh", log, check)
}

#[test]
fn a_passing_boot_passes_every_check() {
    let (ok, out) = checks(&passing_log());
    assert!(ok, "{out}");
    assert!(
        out.ends_with("xen-lab crash: 10 passed, 0 failed\n"),
        "{out}"
    );
}

#[test]
fn a_state_that_moved_at_a_kill_fails() {
    let log = with(&passing_log(), "LAB: kill n=2 ", &|l| {
        Some(l.replace("states=4,4", "states=5,4"))
    });
    fails(&log, "both sides stayed Connected");
}

#[test]
fn a_serve_that_did_not_take_over_fails() {
    let log = with(&passing_log(), "LAB: serve taken-over=", &|l| {
        Some(l.replace("taken-over=5", "taken-over=4"))
    });
    fails(&log, "each new serve took the disk over");
}

#[test]
fn a_lost_write_fails() {
    let log = with(&passing_log(), "GUEST: verify ", &|l| {
        Some(l.replacen("md5=", "md5=0", 1))
    });
    fails(&log, "every block reads back");
}

#[test]
fn a_failed_write_fails() {
    let log = with(&passing_log(), "GUEST: writer done", &|l| {
        Some(format!("GUEST: writer failed at 17\n{l}"))
    });
    fails(&log, "the writer wrote every block");
}

#[test]
fn an_io_error_in_the_guests_kernel_log_fails() {
    let log = with(&passing_log(), "GUEST: dmesg io-errors=", &|_| {
        Some("GUEST: dmesg io-errors=1".into())
    });
    fails(&log, "no I/O error");
}

#[test]
fn a_wait_that_timed_out_fails() {
    let log = with(&passing_log(), "LAB: kills done", &|l| {
        Some(format!(
            "LAB: timeout waiting for 'GUEST: progress blocks=300'\n{l}"
        ))
    });
    fails(&log, "every wait saw its guest line");
}
