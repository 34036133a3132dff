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
