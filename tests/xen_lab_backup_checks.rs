//! The live-backup scenario's checks (`tests/xen-lab/backup-run.sh --checks-only LOG`)
//! without booting the lab: a real passing boot's log passes, and the same log with one step
//! failed makes that step's check FAIL.

mod common;
use common::{edit_lines, lab_check_fails, lab_checks, lab_log};

fn passing_log() -> String {
    lab_log("backup-pass.log")
}

/// `backup-run.sh --checks-only` on `log`: whether it passed, and its stdout.
fn checks(log: &str) -> (bool, String) {
    lab_checks("backup-run.sh", log)
}

/// The log with each line starting `from` changed by `edit` (at least one must).
fn with(log: &str, from: &str, edit: &dyn Fn(&str) -> Option<String>) -> String {
    edit_lines(log, from, edit)
}

/// `key=value` of the first line starting `from` in the passing log.
fn field(from: &str, key: &str) -> String {
    let log = passing_log();
    let line = log
        .lines()
        .find(|l| l.starts_with(from))
        .unwrap_or_else(|| panic!("no line starting {from:?}"));
    line.split(' ')
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
        .to_string()
}

/// The passing log with `key=value` of the lines starting `from` set to `to`.
fn set(from: &str, key: &str, to: &str) -> String {
    let old = format!("{key}={}", field(from, key));
    with(&passing_log(), from, &|l| {
        Some(l.replacen(&old, &format!("{key}={to}"), 1))
    })
}

/// A checksum that differs from `h` in its first digit.
fn other(h: &str) -> String {
    let first = if h.starts_with('0') { "1" } else { "0" };
    format!("{first}{}", &h[1..])
}

fn fails(log: &str, check: &str) {
    lab_check_fails("backup-run.sh", log, check)
}

#[test]
fn a_passing_boot_passes_every_check() {
    let (ok, out) = checks(&passing_log());
    assert!(ok, "{out}");
    assert!(
        out.ends_with("xen-lab backup: 19 passed, 0 failed\n"),
        "{out}"
    );
}

#[test]
fn a_snapshot_that_failed_fails() {
    fails(&set("LAB: snapshot1 ", "rc", "1"), "snapshot s1");
    fails(
        &set("LAB: snapshot2 ", "stack", "file"),
        "snapshot s2: frozen",
    );
}

#[test]
fn a_backup_that_differs_from_the_frozen_image_fails() {
    let copy = field("LAB: backup1 ", "copy");
    fails(
        &set("LAB: backup1 ", "copy", &other(&copy)),
        "backup 1 (nbdcopy) equals the frozen image",
    );
}

#[test]
fn an_image_that_changed_under_the_snapshot_fails() {
    let base = field("LAB: backup2 ", "base-after");
    fails(
        &set("LAB: backup2 ", "base-after", &other(&base)),
        "backup 2 (nbdcopy) equals the frozen image",
    );
}

#[test]
fn a_backup_without_the_guests_blocks_fails() {
    fails(
        &set("LAB: backup1-blocks ", "content", "bad-blocks"),
        "backup 1 holds the guest's first blocks",
    );
    fails(
        &set("LAB: backup2-blocks ", "cut", "0"),
        "backup 2 holds the guest's first blocks",
    );
}

#[test]
fn a_dirty_bitmap_missing_a_block_fails() {
    let covered: u64 = field("LAB: dirty ", "covered").parse().unwrap();
    fails(
        &set("LAB: dirty ", "covered", &(covered - 4096).to_string()),
        "covers every block written between the snapshots",
    );
}

#[test]
fn a_dirty_bitmap_marking_more_fails() {
    let end: u64 = field("LAB: dirty ", "end").parse().unwrap();
    let bytes: u64 = field("LAB: dirty ", "bytes").parse().unwrap();
    let log = with(&passing_log(), "LAB: dirty ", &|l| {
        Some(
            l.replacen(&format!("end={end}"), &format!("end={}", end + 65536), 1)
                .replacen(
                    &format!("bytes={bytes}"),
                    &format!("bytes={}", bytes + 65536),
                    1,
                ),
        )
    });
    fails(&log, "marks no other 64 KiB block");
}

#[test]
fn an_incremental_backup_that_differs_fails() {
    fails(
        &set("LAB: incremental ", "failed", "1"),
        "backup 1 + the dirty blocks",
    );
    let copy = field("LAB: incremental ", "copy");
    fails(
        &set("LAB: incremental ", "copy", &other(&copy)),
        "backup 1 + the dirty blocks",
    );
}

#[test]
fn a_guest_that_did_not_write_during_the_copy_fails() {
    let cut = field("LAB: backup1-blocks ", "cut");
    fails(
        &set("LAB: backup1 ", "progress", &cut),
        "the guest wrote while backup 1 was copied",
    );
}

#[test]
fn a_commit_that_left_the_overlay_or_the_export_fails() {
    fails(&set("LAB: commit1 ", "stack", "cow_over_file"), "commit 1");
    fails(&set("LAB: commit2 ", "export", "open"), "commit 2");
}

#[test]
fn a_writer_that_stopped_early_or_failed_fails() {
    fails(
        &set("GUEST: writer done ", "by", "failed-at-17"),
        "stopped on dom0's signal",
    );
}

#[test]
fn a_lost_write_fails() {
    let md5 = field("GUEST: verify ", "md5");
    fails(
        &set("GUEST: verify ", "md5", &other(&md5)),
        "reads back in the guest",
    );
    let md5 = field("LAB: image ", "md5");
    fails(&set("LAB: image ", "md5", &other(&md5)), "in dom0's image");
}

#[test]
fn an_io_error_in_the_guests_kernel_log_fails() {
    fails(
        &set("GUEST: dmesg io-errors=", "io-errors", "1"),
        "no I/O error",
    );
}

#[test]
fn an_error_in_serves_log_fails() {
    fails(
        &set("LAB: serve errors=", "errors", "2"),
        "serve logged no error",
    );
}

#[test]
fn a_wait_that_timed_out_fails() {
    let log = with(&passing_log(), "LAB: snapshot2 ", &|l| {
        Some(format!(
            "LAB: timeout waiting for 'GUEST: progress blocks=300'\n{l}"
        ))
    });
    fails(&log, "every wait saw its guest line");
}
