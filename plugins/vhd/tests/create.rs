//! Creating images: never over an existing file, never a half-made file at the path.

mod common;
use common::*;
use xen_disk_plugin_api::Disk;

#[test]
fn create_refuses_an_existing_file_and_leaves_no_temporary() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("taken.vhd");
    std::fs::write(&p, b"precious").unwrap();
    for kind in ["fixed", "dynamic"] {
        let e = open(&[
            format!("path={}", p.display()),
            format!("create={kind}"),
            "size=8M".into(),
        ])
        .err()
        .unwrap_or_else(|| panic!("{kind}: created over an existing file"));
        assert!(e.to_string().contains("taken.vhd"), "{e}");
    }
    assert_eq!(std::fs::read(&p).unwrap(), b"precious");
    // A create that fails half-way (the parent is not a VHD) leaves nothing behind.
    let child = dir.path().join("child.vhd");
    assert!(open(&[
        format!("path={}", child.display()),
        "create=differencing".into(),
        format!("parent={}", p.display()),
    ])
    .is_err());
    let made = dir.path().join("new.vhd");
    let d = open(&[
        format!("path={}", made.display()),
        "create=dynamic".into(),
        "size=8M".into(),
    ])
    .unwrap();
    assert!(d.info().size >= 8 << 20);
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "only taken.vhd and new.vhd: {names:?}");
}
