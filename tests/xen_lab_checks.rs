//! The Xen lab's checks (`tests/xen-lab/run.sh --checks-only LOG`) and the guests' checked
//! cold read (`tests/xen-lab/coldread.sh`), without booting the lab: a log in which every
//! step worked passes, and the same log with one step failed makes that step's check FAIL,
//! even where dom0's own messages quote the line the step should have printed.

mod common;
use common::{lab_checks, lab_dir, lab_log, TempDir};
use std::path::Path;
use std::process::Command;

fn passing_log() -> String {
    lab_log("checks-pass.log")
}

/// `run.sh --checks-only` on `log`; returns its exit status and stdout.
fn checks(log: &str) -> (bool, String) {
    lab_checks("run.sh", log)
}

/// The log with the line starting `from` replaced by `to` (which may be several lines).
fn with(log: &str, from: &str, to: &str) -> String {
    let mut hits = 0;
    let out: Vec<String> = log
        .lines()
        .map(|l| {
            if l.starts_with(from) {
                hits += 1;
                to.to_string()
            } else {
                l.to_string()
            }
        })
        .collect();
    assert_eq!(
        hits, 1,
        "the passing log has no single line starting {from:?}"
    );
    out.join("\n") + "\n"
}

#[test]
fn a_log_where_every_step_worked_passes() {
    let (ok, out) = checks(&passing_log());
    assert!(ok, "{out}");
    assert!(!out.contains("FAIL"), "{out}");
    assert!(out.contains(" passed, 0 failed"), "{out}");
}

#[test]
fn a_failed_step_fails_its_check_although_dom0_quotes_its_line() {
    let log = passing_log();
    let cases = [
        // The first detach: the guest never lets go, dom0's wait times out and prints the
        // line it waited for, then the console's tail.
        (
            "GUEST: xvdg gone before-reattach",
            "LAB: timeout waiting for 'GUEST: xvdg gone before-reattach'\n\
             LAB: console GUEST: xvdg fs written md5=abcd",
            &[
                "FAIL  dom0: every wait saw its guest line",
                "FAIL  filesystem: guest lets go at detach",
            ][..],
        ),
        // The rebooted guest never gets its disk.
        (
            "GUEST: xvdh after reboot",
            "LAB: timeout waiting for 'GUEST: xvdh after reboot'\nGUEST: xvdh never appeared",
            &[
                "FAIL  dom0: every wait saw its guest line",
                "FAIL  guest destroyed and created again: serve attaches the disk to the new domain",
                "FAIL  guest destroyed and created again: its write is there",
            ][..],
        ),
        // dd fails on the discard disk (coldread.sh's line for it).
        (
            "GUEST: xvdd dd-read",
            "GUEST: xvdd dd-read-failed exit=1 bytes=0\nGUEST: xvdd dd: dd: /dev/xvdd: I/O error",
            &["FAIL  discard: guest reads 256 MiB"][..],
        ),
        // No ring parked while the guest idled.
        (
            "LAB: b parks=",
            "LAB: b parks=0",
            &["FAIL  file: idle rings parked (ctl stats parks >= 1)"][..],
        ),
        // The woken rings read something else back.
        (
            "GUEST: xvdb after-park",
            "GUEST: xvdb after-park md5-pat=33333333333333333333333333333333",
            &["FAIL  file: parked rings woke and read the pattern back"][..],
        ),
        // A guest line only quoted by dom0 does not give its values either.
        (
            "GUEST: xvdb size=",
            "LAB: console GUEST: xvdb size=524288 lbs=512 ro=0 queues=2",
            &["FAIL  file: guest sees 256 MiB"][..],
        ),
    ];
    for (from, to, fails) in cases {
        let (ok, out) = checks(&with(&log, from, to));
        assert!(!ok, "{from:?} replaced, run.sh still passed:\n{out}");
        for f in fails {
            assert!(out.contains(f), "{from:?} replaced: no {f:?} in\n{out}");
        }
        let failed = out.lines().filter(|l| l.starts_with("FAIL")).count();
        assert_eq!(
            failed,
            fails.len(),
            "{from:?} replaced: other checks failed:\n{out}"
        );
    }
}

/// A real lab run's log (`testdata/broken-steps.log`) with three steps broken on purpose:
/// dom0 never detached xvdg's first attach, `serve` was stopped before the second guest's
/// reboot, and the discard disk sat under the `error` filter failing reads from 128 MiB.
/// Before the checks matched whole lines, the three checks of those steps passed on it. (The
/// run predates coldread's size argument: its second guest's 256 MiB read of a 64 MiB disk
/// shows as dd-read-failed, which only the speed figure reads.)
#[test]
fn a_real_run_with_three_steps_broken_fails_their_checks() {
    let log = lab_log("broken-steps.log");
    let (ok, out) = checks(&log);
    assert!(!ok, "{out}");
    let failed: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("FAIL  "))
        .map(|l| l.split(" (got").next().unwrap())
        .collect();
    assert_eq!(
        failed,
        [
            "dom0: every wait saw its guest line",
            // The run predates the park scenario: its lines are missing.
            "file: idle rings parked (ctl stats parks >= 1)",
            "file: parked rings woke and read the pattern back",
            "discard: guest reads 256 MiB",
            "filesystem: guest lets go at detach",
            "filesystem: intact after reattach",
            "guest destroyed and created again: serve attaches the disk to the new domain",
            "guest destroyed and created again: its write is there",
            // serve was already gone when dom0 stopped it.
            "second serve: SIGTERM exits 0",
            // The first guest gave up waiting for xvdi while dom0 still waited for the
            // rebooted second guest's disk.
            "serve: configured disk's data",
            "serve: toolstack device's data",
        ],
        "{out}"
    );
}

/// `coldread xvdz 256 PATH` under `sh`, in a scratch directory.
fn coldread(path: &Path) -> String {
    let dir = TempDir::new("coldread");
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            ". '{}'; coldread xvdz 256 \"$1\"",
            lab_dir().join("coldread.sh").display()
        ))
        .arg("sh")
        .arg(path)
        .env("TMPDIR", &dir.0)
        .env("DROP_CACHES", dir.join("drop_caches"))
        .output()
        .expect("sh");
    assert!(o.status.success());
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn the_guests_cold_read_reports_a_read_only_when_dd_read_it_all() {
    let dir = TempDir::new("coldread-files");
    let full = dir.join("full");
    std::fs::File::create(&full)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let out = coldread(&full);
    assert!(
        out.starts_with("GUEST: xvdz dd-read bytes=268435456 start="),
        "{out}"
    );
    // Short by one block: dd succeeds, the count does not.
    let short = dir.join("short");
    std::fs::File::create(&short)
        .unwrap()
        .set_len(255 << 20)
        .unwrap();
    let out = coldread(&short);
    assert!(
        out.starts_with("GUEST: xvdz dd-read-failed exit=0 bytes=267386880"),
        "{out}"
    );
    // dd itself fails (a directory cannot be read).
    let out = coldread(&dir.0);
    assert!(
        out.starts_with("GUEST: xvdz dd-read-failed exit=1"),
        "{out}"
    );
    assert!(!out.contains("dd-read bytes="), "{out}");
}
