//! The xl lab's checks (`tests/xen-lab/xl-run.sh --checks-only LOG`), without booting the
//! lab: a real run's log in which every step worked (`testdata/xl-checks-pass.log`) passes,
//! and copies with one step failed fail that step's check and no other, even where dom0's
//! messages quote the guest line the step should have printed.

mod common;
use common::{lab_checks, lab_log};

fn passing_log() -> String {
    lab_log("xl-checks-pass.log")
}

/// `xl-run.sh --checks-only` on `log`; its exit status and stdout.
fn checks(log: &str) -> (bool, String) {
    lab_checks("xl-run.sh", log)
}

/// The log with its one line starting `from` changed by `f` (which may return several lines).
fn with(log: &str, from: &str, f: impl Fn(&str) -> String) -> String {
    let mut hits = 0;
    let out: Vec<String> = log
        .lines()
        .map(|l| {
            if l.starts_with(from) {
                hits += 1;
                f(l)
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
fn a_real_run_where_every_step_worked_passes() {
    let (ok, out) = checks(&passing_log());
    assert!(ok, "{out}");
    assert!(!out.contains("FAIL"), "{out}");
    assert!(out.contains(" passed, 0 failed"), "{out}");
}

#[test]
fn a_failed_step_fails_its_check_and_no_other() {
    let log = passing_log();
    type Case<'a> = (&'a str, Box<dyn Fn(&str) -> String>, &'a [&'a str]);
    let cases: Vec<Case> = vec![
        // The guest never lets go of the detached disk: dom0's wait times out and quotes
        // the line it waited for, and the console's tail.
        (
            "GUEST: xvdf gone",
            Box::new(|_| {
                "LAB: timeout waiting for 'GUEST: xvdf gone'\nLAB: console GUEST: xvdf gone".into()
            }),
            &[
                "FAIL  dom0: every wait saw its guest line",
                "FAIL  block-detach: guest sees the disk go",
            ],
        ),
        // A block the guest wrote before the save is missing after the restore.
        (
            "LAB: writer blocks-ok=",
            Box::new(|_| "LAB: writer blocks-ok=199".into()),
            &["FAIL  restore: every block the guest wrote is on disk"],
        ),
        // The guest's line only quoted by dom0 does not count.
        (
            "GUEST: writer done",
            Box::new(|l| format!("LAB: console {l}")),
            &["FAIL  restore: the guest's writer finishes"],
        ),
        // The raw disk came back as the 1 TiB its qcow2-looking header claims.
        (
            "GUEST: xvdb after-reboot",
            Box::new(|l| l.replace(" size=65536 ", " size=2147483648 ")),
            &["FAIL  raw with a qcow2 header: same size"],
        ),
        (
            "LAB: d compare=",
            Box::new(|_| "LAB: d compare=1".into()),
            &["FAIL  descriptor: qcow2 qemu-img compare with the guest's writes"],
        ),
        (
            "LAB: destroy entries-left=",
            Box::new(|_| "LAB: destroy entries-left=yes".into()),
            &["FAIL  destroy while writing: no backend entries left"],
        ),
        (
            "LAB: destroy ctl-devices-left=",
            Box::new(|_| "LAB: destroy ctl-devices-left=1".into()),
            &["FAIL  destroy while writing: ctl lists none of its devices"],
        ),
        (
            "LAB: save while-writing=",
            Box::new(|_| "LAB: save while-writing=no".into()),
            &["FAIL  save: while the guest writes"],
        ),
    ];
    for (from, f, fails) in cases {
        let changed = with(&log, from, f);
        let (ok, out) = checks(&changed);
        assert!(!ok, "{from:?} changed, xl-run.sh still passed:\n{out}");
        for want in fails {
            assert!(
                out.contains(want),
                "{from:?} changed: no {want:?} in\n{out}"
            );
        }
        let failed = out.lines().filter(|l| l.starts_with("FAIL")).count();
        assert_eq!(
            failed,
            fails.len(),
            "{from:?} changed: other checks failed:\n{out}"
        );
    }
}

/// A real run before `serve` stopped re-creating directories libxl was removing
/// (`testdata/xl-entries-left.log`): after `xl block-detach` and `xl reboot`, entries were
/// left in xenstore, and exactly those two checks fail on it.
#[test]
fn a_real_run_that_left_entries_fails_those_checks() {
    let log = lab_log("xl-entries-left.log");
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
            "block-detach: backend entries removed",
            "reboot: the old domain's entries removed",
        ],
        "{out}"
    );
}
