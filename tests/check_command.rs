//! `check` over an image that holds data: by default it only reads and leaves every byte as it
//! was, even when a case fails; `--destructive` runs the write cases over the data.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;

/// Runs `check ARGS`, expecting `code`; returns stdout.
fn check(args: &[&str], code: i32) -> String {
    let mut all = vec!["check"];
    all.extend_from_slice(args);
    let o = host(&all);
    let out = stdout(&o);
    assert_eq!(
        o.status.code(),
        Some(code),
        "check {args:?}:\n{out}{}",
        stderr(&o)
    );
    out
}

fn qemu_img(args: &[&str]) {
    let o = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is needed for this test (apt-get install qemu-utils)");
    assert!(o.status.success(), "qemu-img {args:?}: {}", stderr(&o));
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn path_key(img: &Path) -> String {
    format!("path={}", img.display())
}

#[test]
fn default_check_leaves_an_image_with_data_byte_identical() {
    let t = TempDir::new("check-keep");
    let img = t.join("keep.img");
    random_file(&img, 16 << 20, 41);
    let before = std::fs::read(&img).unwrap();
    let qcow = t.join("keep.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&img), s(&qcow)]);
    let qcow_before = std::fs::read(&qcow).unwrap();
    for (plugin, image, want) in [
        ("file", &img, &before),
        ("mmap", &img, &before),
        ("qcow2", &qcow, &qcow_before),
    ] {
        let out = check(&[plugin, "-c", &path_key(image)], 0);
        assert!(
            std::fs::read(image).unwrap() == *want,
            "check {plugin} changed {}",
            image.display()
        );
        assert!(
            out.contains(" 0 failed")
                && out.contains("ok    reads")
                && out.contains("check: read-only run"),
            "{out}"
        );
        // The write cases are reported, naming the flag that runs them.
        for case in ["pattern", "first-last", "write-zeroes", "concurrency"] {
            assert!(
                out.lines().any(
                    |l| l.starts_with(&format!("skip  {case} ")) && l.contains("--destructive")
                ),
                "{plugin}: {case} should be skipped naming --destructive:\n{out}"
            );
        }
    }
    // A failing case changes nothing either.
    let base = format!("base.path={}", img.display());
    let out = check(
        &["error", "-c", "sectors=0-7", "-c", "base=file", "-c", &base],
        1,
    );
    assert!(out.contains("FAIL  reads"), "{out}");
    assert!(std::fs::read(&img).unwrap() == before, "the image changed");
}

#[test]
fn destructive_check_runs_the_write_cases_over_the_data() {
    let t = TempDir::new("check-scratch");
    let img = t.join("scratch.img");
    random_file(&img, 16 << 20, 42);
    let before = std::fs::read(&img).unwrap();
    let out = check(&["file", "-c", &path_key(&img), "--destructive"], 0);
    for case in [
        "reads",
        "pattern",
        "first-last",
        "write-zeroes",
        "discard",
        "concurrency",
    ] {
        assert!(out.contains(&format!("ok    {case} ")), "{case}:\n{out}");
    }
    assert!(!out.contains("read-only run"), "{out}");
    assert!(
        std::fs::read(&img).unwrap() != before,
        "nothing was written"
    );
}
