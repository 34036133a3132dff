//! Differencing chains of depth 3 made by the plugin's create, against an in-memory model.

mod common;
use common::*;
use xen_disk_plugin_api::Disk;

#[test]
fn depth_three_chain_matches_model() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).display().to_string();
    let base = open(&[
        format!("path={}", p("base.vhd")),
        "create=dynamic".into(),
        "size=24M".into(),
        "block-size=1M".into(),
    ])
    .unwrap();
    let size = base.info().size as usize;
    let mut model = vec![0u8; size];
    let apply = |d: &xen_disk_plugin_api::ForeignDisk,
                 model: &mut Vec<u8>,
                 seed: u64,
                 off: usize,
                 len: usize| {
        let data = pattern(seed, len);
        write(d, off as u64, &data);
        model[off..off + len].copy_from_slice(&data);
    };
    apply(&base, &mut model, 1, 0, 3 << 20);
    apply(&base, &mut model, 2, 10 << 20, 4096);
    drop(base);
    let mid = open(&[
        format!("path={}", p("mid.vhd")),
        "create=differencing".into(),
        format!("parent={}", p("base.vhd")),
    ])
    .unwrap();
    assert_eq!(mid.info().size as usize, size);
    assert!(read(&mid, 0, size) == model, "fresh child reads the parent");
    apply(&mid, &mut model, 3, 4096, 1024);
    apply(&mid, &mut model, 4, (2 << 20) + 512, 1 << 20);
    drop(mid);
    let top = open(&[
        format!("path={}", p("top.vhd")),
        "create=differencing".into(),
        format!("parent={}", p("mid.vhd")),
    ])
    .unwrap();
    apply(&top, &mut model, 5, 8192, 512);
    apply(&top, &mut model, 6, 20 << 20, 5000 / 512 * 512);
    apply(&top, &mut model, 7, 8192 + 1024, 512);
    top.flush().unwrap();
    assert!(
        read(&top, 0, size) == model,
        "top of chain differs from model"
    );
    // Scattered small reads cross bitmap runs and block edges.
    for (off, len) in [
        (4096 - 512, 2048),
        ((1 << 20) - 512, 1024),
        ((3 << 20) - 1024, 4096),
    ] {
        assert!(
            read(&top, off as u64, len) == model[off..off + len],
            "read at {off}"
        );
    }
    drop(top);
    // Reopen the whole chain from disk; the parents were not modified by child writes.
    let top = open_path(&dir.path().join("top.vhd")).unwrap();
    assert!(read(&top, 0, size) == model);
    let base = open_path(&dir.path().join("base.vhd")).unwrap();
    assert_eq!(
        read(&base, 8192, 512),
        pattern(1, 3 << 20)[8192..8704].to_vec()
    );
}

/// Old tools wrote only the deprecated ANSI locators (Wi2r relative, Wi2k absolute): the
/// parent is found through them when the header's name and the Unicode locators are gone.
#[test]
fn deprecated_ansi_locators_find_the_parent() {
    use std::os::unix::fs::FileExt;
    use vhd::header::{Header, HEADER_SIZE, PLAT_WI2K, PLAT_WI2R};
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("kids")).unwrap();
    let base = dir.path().join("base.vhd");
    let d = open(&[
        format!("path={}", base.display()),
        "create=dynamic".into(),
        "size=4M".into(),
    ])
    .unwrap();
    let data = pattern(11, 1 << 20);
    write(&d, 0, &data);
    drop(d);
    for (code, text) in [
        (PLAT_WI2R, "..\\base.vhd".to_string()),
        (PLAT_WI2K, base.display().to_string()),
    ] {
        let child = dir.path().join("kids").join(format!("c{code:x}.vhd"));
        drop(
            open(&[
                format!("path={}", child.display()),
                "create=differencing".into(),
                format!("parent={}", base.display()),
            ])
            .unwrap(),
        );
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&child)
            .unwrap();
        let mut raw = [0u8; HEADER_SIZE];
        f.read_exact_at(&mut raw, 512).unwrap();
        let mut h = Header::parse(&raw, "child").unwrap();
        let mut loc = h.locators[0];
        h.parent_name = String::new();
        loc.code = code;
        loc.len = text.len() as u32;
        h.locators = vec![loc];
        f.write_all_at(&vec![0u8; loc.space as usize], loc.offset)
            .unwrap();
        f.write_all_at(text.as_bytes(), loc.offset).unwrap();
        f.write_all_at(&h.encode(), 512).unwrap();
        drop(f);
        let c = open_path(&child).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert!(read(&c, 0, 1 << 20) == data, "{text}: parent data not read");
    }
}
