//! write-zeroes and discard: ranges read back as the model says, holes free space in the
//! file, qemu-img agrees on the result, and a differencing disk's parent shows through only
//! where the semantics allow.

mod common;
use common::*;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use xen_disk_plugin_api::Disk;

const M: usize = 1 << 20;

fn allocated_bytes(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

fn qemu_compare(img: &Path, model: &[u8]) {
    let raw = img.with_extension("model");
    std::fs::write(&raw, model).unwrap();
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

fn zeroes_and_discard_match_model(kind: &str) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("z.vhd");
    let d = open(&[
        format!("path={}", img.display()),
        format!("create={kind}"),
        "size=16M".into(),
    ])
    .unwrap();
    let info = d.info();
    assert!(info.can_discard && info.can_write_zeroes, "{info:?}");
    let size = info.size as usize;
    let mut model = vec![0u8; size];
    let data = pattern(9, 10 * M);
    write(&d, 0, &data);
    model[..10 * M].copy_from_slice(&data);
    d.flush().unwrap();
    let before = allocated_bytes(&img);

    // Zeroes over a block edge, a sector-sized one, one into never-written space.
    for (off, len) in [(M + 512, 3 * M), (7 * M + 1536, 512), (9 * M, 4 * M)] {
        d.write_zeroes(off as u64, len as u64).unwrap();
        model[off..off + len].fill(0);
    }
    // Discard reads back zeroes on a disk without a parent.
    d.discard(5 * M as u64, (M + 4096) as u64).unwrap();
    model[5 * M..6 * M + 4096].fill(0);
    d.flush().unwrap();
    assert!(
        read(&d, 0, size) == model,
        "{kind}: reads differ from the model"
    );
    let after = allocated_bytes(&img);
    assert!(
        after + 4 * M as u64 <= before,
        "{kind}: zeroed and discarded ranges were not freed ({before} -> {after} bytes)"
    );
    drop(d);
    // Reopened, and as qemu sees it.
    let d = open_path(&img).unwrap();
    assert!(read(&d, 0, size) == model, "{kind}: reopened image differs");
    drop(d);
    qemu_compare(&img, &model);
}

#[test]
fn dynamic_zeroes_and_discard_match_model_and_qemu() {
    zeroes_and_discard_match_model("dynamic");
}

#[test]
fn fixed_zeroes_and_discard_match_model_and_qemu() {
    zeroes_and_discard_match_model("fixed");
}

#[test]
fn zeroes_on_an_unwritten_dynamic_disk_allocate_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("u.vhd");
    let d = open(&[
        format!("path={}", img.display()),
        "create=dynamic".into(),
        "size=64M".into(),
    ])
    .unwrap();
    let len0 = std::fs::metadata(&img).unwrap().len();
    d.write_zeroes(0, 64 * M as u64).unwrap();
    d.discard(0, 64 * M as u64).unwrap();
    assert_eq!(
        std::fs::metadata(&img).unwrap().len(),
        len0,
        "no block allocated"
    );
    assert!(read(&d, 0, M).iter().all(|&b| b == 0));
}

#[test]
fn differencing_zeroes_hide_the_parent_and_discard_does_not_expose_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).display().to_string();
    let base = open(&[
        format!("path={}", p("base.vhd")),
        "create=dynamic".into(),
        "size=8M".into(),
        "block-size=1M".into(),
    ])
    .unwrap();
    let size = base.info().size as usize;
    let parent = pattern(1, size);
    write(&base, 0, &parent);
    drop(base);
    let child = open(&[
        format!("path={}", p("child.vhd")),
        "create=differencing".into(),
        format!("parent={}", p("base.vhd")),
    ])
    .unwrap();
    let mut model = parent.clone();
    // The child writes [1M, 2M), then zeroes [512K, 3M): parent-only and child sectors alike
    // must read zero.
    let own = pattern(2, M);
    write(&child, M as u64, &own);
    child
        .write_zeroes((M / 2) as u64, (5 * M / 2) as u64)
        .unwrap();
    model[M / 2..3 * M].fill(0);
    // The child writes [4M, 4M + 64K) then discards [4M - 64K, 4M + 128K): its own sectors
    // read zero, sectors it never wrote still read the parent.
    let own = pattern(3, 64 << 10);
    write(&child, 4 * M as u64, &own);
    child
        .discard((4 * M - (64 << 10)) as u64, (192 << 10) as u64)
        .unwrap();
    model[4 * M..4 * M + (64 << 10)].fill(0);
    child.flush().unwrap();
    assert!(
        read(&child, 0, size) == model,
        "child reads differ from model"
    );
    drop(child);
    let child = open_path(&dir.path().join("child.vhd")).unwrap();
    assert!(read(&child, 0, size) == model, "reopened child differs");
    let base = open_path(&dir.path().join("base.vhd")).unwrap();
    assert!(read(&base, 0, size) == parent, "the parent was modified");
}
