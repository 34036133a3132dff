//! kill -9 during a write-heavy run: a re-exec of this test binary writes and flushes,
//! reporting each flushed write on stdout; the parent kills it, reopens, and checks every
//! reported write is present and that qemu reads the same image the plugin does.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use xen_disk_plugin_api::Disk;

const STRIDE: u64 = 192 * 1024;
const LEN: usize = 64 * 1024;
const ENV: &str = "VHD_CRASH_CHILD_IMAGE";

/// The child half of the test below; run only by it.
#[test]
#[ignore = "run as a child process by kill_9_keeps_flushed_writes_and_metadata"]
fn crash_child() {
    let path = std::env::var(ENV)
        .unwrap_or_else(|_| panic!("{ENV} not set: this test is a child process"));
    let d = open_path(std::path::Path::new(&path)).unwrap();
    let blocks = d.info().size / STRIDE;
    let mut out = std::io::stdout().lock();
    for i in 0u64.. {
        let off = (i % blocks) * STRIDE;
        write(&d, off, &pattern(i, LEN));
        if i % 3 == 0 {
            d.flush().unwrap();
            writeln!(out, "flushed {i}").unwrap();
            out.flush().unwrap();
        }
    }
}

#[test]
fn kill_9_keeps_flushed_writes_and_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("crash.vhd");
    let d = open(&[
        format!("path={}", img.display()),
        "create=dynamic".into(),
        "size=64M".into(),
        "block-size=512K".into(),
    ])
    .unwrap();
    let size = d.info().size;
    drop(d);
    let blocks = size / STRIDE;
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "crash_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ENV, &img)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut last = None;
    while let Some(Ok(l)) = lines.next() {
        if let Some(n) = l.strip_prefix("flushed ") {
            last = Some(n.trim().parse::<u64>().unwrap());
            // Stop before offsets wrap so each offset's expected content is unambiguous.
            if last.unwrap() >= blocks - 10 {
                break;
            }
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let last = last.expect("child reported no flushed write");
    assert!(last > 50, "child only flushed {last} writes");
    let d = open_path(&img).expect("reopen after kill -9");
    for i in 0..=last {
        assert!(
            read(&d, i * STRIDE, LEN) == pattern(i, LEN),
            "flushed write {i} lost"
        );
    }
    // qemu reads the same bytes as the plugin: the metadata is consistent for both.
    let all = read(&d, 0, size as usize);
    drop(d);
    let raw = dir.path().join("crash.raw");
    std::fs::write(&raw, &all).unwrap();
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "vpc",
            "-F",
            "raw",
            img.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
}
