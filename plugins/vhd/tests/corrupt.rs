//! Hand-made corrupt images: each gives one clear error naming the file and field.

mod common;
use common::*;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use xen_disk_plugin_api::ErrorKind;

fn make_dynamic(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let d = open(&[
        format!("path={}", p.display()),
        "create=dynamic".into(),
        "size=8M".into(),
    ])
    .unwrap();
    write(&d, 0, &pattern(1, 4096));
    p
}

fn expect_err(p: &Path, needle: &str) {
    let e = open_path(p)
        .err()
        .unwrap_or_else(|| panic!("{} opened but should not", p.display()));
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.message().contains(needle), "{e} lacks {needle:?}");
    assert!(
        e.message()
            .contains(p.file_name().unwrap().to_str().unwrap()),
        "{e} does not name the file"
    );
}

fn patch(p: &Path, at: u64, bytes: &[u8]) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .unwrap()
        .write_all_at(bytes, at)
        .unwrap();
}

fn footer_at(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len() - 512
}

#[test]
fn bad_footer_checksum_both_copies() {
    let dir = tempfile::tempdir().unwrap();
    let p = make_dynamic(dir.path(), "sum.vhd");
    patch(&p, footer_at(&p) + 64, &[0, 0, 0, 1]);
    patch(&p, 64, &[0, 0, 0, 1]);
    expect_err(&p, "footer checksum");
}

#[test]
fn bad_cookie() {
    let dir = tempfile::tempdir().unwrap();
    let p = make_dynamic(dir.path(), "cookie.vhd");
    patch(&p, footer_at(&p), b"XXXXXXXX");
    patch(&p, 0, b"XXXXXXXX");
    expect_err(&p, "cookie");
}

#[test]
fn bad_header_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let p = make_dynamic(dir.path(), "hdr.vhd");
    patch(&p, 512 + 28, &[0, 0, 0, 9]);
    expect_err(&p, "dynamic header checksum");
}

#[test]
fn truncated() {
    let dir = tempfile::tempdir().unwrap();
    let p = make_dynamic(dir.path(), "trunc.vhd");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(100)
        .unwrap();
    expect_err(&p, "too short");
    let p = make_dynamic(dir.path(), "trunc2.vhd");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(1000)
        .unwrap();
    expect_err(&p, "trunc2.vhd");
}

#[test]
fn bat_entry_outside_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = make_dynamic(dir.path(), "bat.vhd");
    patch(&p, 1536 + 4, &0x00ff_0000u32.to_be_bytes());
    expect_err(&p, "BAT entry 1");
    let p = make_dynamic(dir.path(), "batmeta.vhd");
    patch(&p, 1536 + 4, &1u32.to_be_bytes());
    expect_err(&p, "BAT entry 1");
}

#[test]
fn overlapping_bat_entries() {
    let dir = tempfile::tempdir().unwrap();
    let p = make_dynamic(dir.path(), "ovl.vhd");
    let mut first = [0u8; 4];
    std::fs::File::open(&p)
        .unwrap()
        .read_exact_at(&mut first, 1536)
        .unwrap();
    patch(&p, 1536 + 4, &first);
    expect_err(&p, "overlap");
}

#[test]
fn too_large() {
    let dir = tempfile::tempdir().unwrap();
    let e = open(&[
        format!("path={}", dir.path().join("big.vhd").display()),
        "create=dynamic".into(),
        "size=2041G".into(),
    ])
    .err()
    .unwrap();
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    assert!(e.message().contains("size"), "{e}");
}

fn diff(dir: &Path, name: &str, parent: &Path) -> PathBuf {
    let p = dir.join(name);
    open(&[
        format!("path={}", p.display()),
        "create=differencing".into(),
        format!("parent={}", parent.display()),
    ])
    .unwrap();
    p
}

#[test]
fn missing_parent() {
    let dir = tempfile::tempdir().unwrap();
    let base = make_dynamic(dir.path(), "base.vhd");
    let child = diff(dir.path(), "child.vhd", &base);
    std::fs::remove_file(&base).unwrap();
    expect_err(&child, "not found");
}

#[test]
fn parent_uuid_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let base = make_dynamic(dir.path(), "base.vhd");
    let child = diff(dir.path(), "child.vhd", &base);
    std::fs::remove_file(&base).unwrap();
    make_dynamic(dir.path(), "base.vhd");
    expect_err(&child, "UUID");
}

#[test]
fn parent_loop() {
    let dir = tempfile::tempdir().unwrap();
    let base = make_dynamic(dir.path(), "base.vhd");
    let a = diff(dir.path(), "a.vhd", &base);
    let b = diff(dir.path(), "b.vhd", &a);
    // Make base.vhd a copy of b.vhd: a -> base(=b) -> a loops.
    std::fs::copy(&b, &base).unwrap();
    let e = open_path(&a).err().unwrap();
    assert!(
        e.message().contains("loop") || e.message().contains("UUID"),
        "{e}"
    );
    // A pure self-loop: a file whose parent is itself with its own UUID.
    let selfp = dir.path().join("self.vhd");
    std::fs::copy(&a, &selfp).unwrap();
    let mut uuid = [0u8; 16];
    let len = std::fs::metadata(&selfp).unwrap().len();
    std::fs::File::open(&selfp)
        .unwrap()
        .read_exact_at(&mut uuid, len - 512 + 68)
        .unwrap();
    let mut hdr = [0u8; 1024];
    std::fs::File::open(&selfp)
        .unwrap()
        .read_exact_at(&mut hdr, 512)
        .unwrap();
    hdr[40..56].copy_from_slice(&uuid);
    // Point every locator and the name at self.vhd.
    for i in 0..8 {
        hdr[576 + i * 24..576 + i * 24 + 4].copy_from_slice(&[0; 4]);
    }
    hdr[64..576].fill(0);
    for (i, u) in "self.vhd".encode_utf16().enumerate() {
        hdr[64 + 2 * i..66 + 2 * i].copy_from_slice(&u.to_be_bytes());
    }
    hdr[36..40].fill(0);
    let sum = !hdr.iter().fold(0u32, |s, &x| s.wrapping_add(u32::from(x)));
    hdr[36..40].copy_from_slice(&sum.to_be_bytes());
    patch(&selfp, 512, &hdr);
    expect_err(&selfp, "loops");
}

#[test]
fn torn_end_footer_recovers_from_copy() {
    let dir = tempfile::tempdir().unwrap();
    let p = make_dynamic(dir.path(), "torn.vhd");
    // As if a crash left the end of the file without a footer.
    patch(&p, footer_at(&p), &[0u8; 512]);
    let d = open_path(&p).expect("footer copy in sector 0 is used");
    assert!(read(&d, 0, 4096) == pattern(1, 4096));
    // The next allocation writes a fresh footer at the end.
    write(&d, 4 << 20, &pattern(2, 512));
    drop(d);
    let mut cookie = [0u8; 8];
    std::fs::File::open(&p)
        .unwrap()
        .read_exact_at(&mut cookie, footer_at(&p))
        .unwrap();
    assert_eq!(&cookie, b"conectix");
}
