//! The Xen lab's `run` step around QEMU, with a stand-in `qemu-system-x86_64` first in PATH:
//! a dom0 that crashes while it boots (an emulator flake seen with Linux 6.12 under TCG) is
//! stopped at once and booted again, once; a crash after dom0 was ready is the lab's result.

mod common;

use common::{lab_dir, TempDir};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

const CRASH: &str = "(XEN) RIP:    e033:[<ffffffff81234567>] enqueue_timer+0x1/0x2\n\
                     (XEN) Hardware Dom0 crashed: 'noreboot' set - not rebooting.\n";
const GOOD: &str = "DOM0: ready\nLAB: hello from dom0\nDOM0: done\n";

/// A `qemu-system-x86_64` whose Nth start prints `boots[N-1]` and then, like Xen halting
/// after a crash, stays up until killed (or exits when the text says dom0 is done).
fn fake_qemu(dir: &Path, boots: &[&str]) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for (i, text) in boots.iter().enumerate() {
        std::fs::write(dir.join(format!("boot{}", i + 1)), text).unwrap();
    }
    let script = format!(
        "#!/bin/sh\nn=$(cat {d}/count 2>/dev/null || echo 0); n=$((n + 1)); echo $n > {d}/count\n\
         cat {d}/boot$n\ngrep -q 'DOM0: done' {d}/boot$n && exit 0\nexec sleep 60\n",
        d = dir.display()
    );
    let q = bin.join("qemu-system-x86_64");
    std::fs::write(&q, script).unwrap();
    std::fs::set_permissions(&q, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// `xen-lab.sh run` over an empty build in `dir`: (stdout, stderr, QEMU starts, seconds).
fn lab_run(dir: &TempDir) -> (String, String, u32, u64) {
    let out = dir.join("out");
    for d in ["dom0/guest", "domU"] {
        std::fs::create_dir_all(out.join(d)).unwrap();
    }
    std::fs::write(out.join("release"), "12 4.17 6.1\n").unwrap();
    std::fs::write(dir.join("lab.sh"), "#!/bin/sh\necho LAB: hello\n").unwrap();
    let path = format!(
        "{}:{}",
        dir.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let started = Instant::now();
    let o = Command::new("bash")
        .arg(lab_dir().join("xen-lab.sh"))
        .arg("run")
        .arg(dir.join("lab.sh"))
        .env("PATH", path)
        .env("OUT", &out)
        .env("LAB_RELEASE", "12")
        .env("LAB_TIMEOUT", "50")
        .output()
        .expect("bash");
    let took = started.elapsed();
    assert!(o.status.success(), "run failed: {o:?}");
    let count = std::fs::read_to_string(dir.join("count"))
        .unwrap_or_default()
        .trim()
        .parse()
        .unwrap_or(0);
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
        count,
        took.as_secs(),
    )
}

#[test]
fn a_dom0_that_crashes_while_booting_is_booted_again() {
    let dir = TempDir::new("labboot-retry");
    fake_qemu(&dir.0, &[CRASH, GOOD]);
    let (out, err, starts, secs) = lab_run(&dir);
    assert_eq!(starts, 2, "stderr: {err}");
    assert!(
        err.contains("dom0 crashed while booting, before the lab ran")
            && err.contains("enqueue_timer")
            && err.contains("booting again"),
        "{err}"
    );
    assert!(out.contains("LAB: hello from dom0"), "{out}");
    assert!(err.contains("dom0 ready after"), "{err}");
    assert!(!err.contains("LAB_TIMEOUT"), "{err}");
    assert!(
        dir.join("out/serial-crashed-boot.log").exists(),
        "the crashed boot's log is kept"
    );
    assert!(secs < 40, "the crash was waited out ({secs} s)");
}

#[test]
fn a_dom0_that_crashes_on_every_boot_is_tried_twice_and_given_up_quickly() {
    let dir = TempDir::new("labboot-twice");
    fake_qemu(&dir.0, &[CRASH, CRASH, GOOD]);
    let (out, err, starts, secs) = lab_run(&dir);
    assert_eq!(starts, 2, "stderr: {err}");
    assert!(err.contains("booting again"), "{err}");
    assert!(
        err.contains("release 12: dom0 crashed (") && err.contains("enqueue_timer"),
        "{err}"
    );
    assert!(!out.contains("LAB:"), "{out}");
    assert!(secs < 40, "the crash was waited out ({secs} s)");
}

#[test]
fn a_crash_after_dom0_was_ready_is_the_result_and_is_not_retried() {
    let dir = TempDir::new("labboot-late");
    let late = format!("DOM0: ready\nLAB: step one\n{CRASH}");
    fake_qemu(&dir.0, &[&late, GOOD]);
    let (out, err, starts, secs) = lab_run(&dir);
    assert_eq!(starts, 1, "stderr: {err}");
    assert!(!err.contains("booting again"), "{err}");
    assert!(err.contains("release 12: dom0 crashed ("), "{err}");
    assert!(out.contains("LAB: step one"), "{out}");
    assert!(secs < 40, "the crash was waited out ({secs} s)");
}
