//! Helpers shared by the qcow2 integration tests: scratch folders and QEMU's tools as the
//! reference (a missing tool fails the test).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// A scratch folder, removed when the test ends (also when it fails).
pub struct TmpDir(PathBuf);

impl std::ops::Deref for TmpDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A new, empty scratch folder named after `tag` and this process.
pub fn tmpdir(tag: &str) -> TmpDir {
    let d = std::env::temp_dir().join(format!("qcow2-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TmpDir(d)
}

/// Runs `cmd ARGS`, which must succeed; its stdout.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} must be installed: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img check IMG`: its exit code (0 clean, 3 leaks only, else corruption or an error)
/// and its output.
pub fn qemu_img_check(img: &Path) -> (i32, String) {
    let out = Command::new("qemu-img")
        .args(["check", img.to_str().unwrap()])
        .output()
        .unwrap_or_else(|e| panic!("qemu-img must be installed: {e}"));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// The guest-visible bytes of `img` as QEMU reads them (`qemu-img convert -O raw`, to a
/// file beside it).
pub fn raw_of(img: &Path) -> Vec<u8> {
    let raw = img.with_extension("expect.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            img.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    let bytes = std::fs::read(&raw).unwrap();
    let _ = std::fs::remove_file(raw);
    bytes
}

/// `qemu-img check` finds nothing at all: no corruption, no leak.
pub fn check_clean(img: &Path) {
    let (code, text) = qemu_img_check(img);
    assert_eq!(code, 0, "qemu-img check {}: {text}", img.display());
    assert!(
        text.contains("No errors were found"),
        "qemu-img check {}: {text}",
        img.display()
    );
}

/// `qemu-img compare` finds the qcow2 image `img` equal to `expect` (a raw file beside it).
pub fn compare_to_raw(img: &Path, expect: &[u8]) {
    let raw = img.with_extension("expect.raw");
    std::fs::write(&raw, expect).unwrap();
    let (i, r) = (img.to_str().unwrap(), raw.to_str().unwrap());
    run("qemu-img", &["compare", "-f", "qcow2", "-F", "raw", i, r]);
    let _ = std::fs::remove_file(raw);
}
