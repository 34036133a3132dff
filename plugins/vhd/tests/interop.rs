//! Interop with qemu-img/qemu-io (format `vpc`) both ways, dynamic and fixed.

mod common;
use common::*;
use xen_disk_plugin_api::Disk;

fn qemu_made_reads_identical(subformat: &str) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("q.vhd");
    let raw = dir.path().join("q.raw");
    let i = img.to_str().unwrap();
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "vpc",
            "-o",
            &format!("subformat={subformat}"),
            i,
            "64M",
        ],
    );
    for c in [
        "write -P 0xab 0 1M",
        "write -P 0x17 3M 5k",
        "write -P 0x42 31M 2M",
        "write -P 0x99 60M 512",
    ] {
        run("qemu-io", &["-f", "vpc", "-c", c, i]);
    }
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "vpc",
            "-O",
            "raw",
            i,
            raw.to_str().unwrap(),
        ],
    );
    let want = std::fs::read(&raw).unwrap();
    let d = open(&[format!("path={i}"), "readonly=true".into()]).unwrap();
    assert_eq!(d.info().size, want.len() as u64);
    let got = read(&d, 0, want.len());
    assert!(got == want, "plugin read differs from qemu-img convert");
    assert_eq!(&got[0..4], &[0xab; 4]);
}

#[test]
fn qemu_dynamic_reads_identical() {
    qemu_made_reads_identical("dynamic");
}

#[test]
fn qemu_fixed_reads_identical() {
    qemu_made_reads_identical("fixed");
}

fn plugin_written_passes_qemu(kind: &str, block: &str) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("p.vhd");
    let raw = dir.path().join("p.raw");
    let i = img.to_str().unwrap();
    let d = open(&[
        format!("path={i}"),
        format!("create={kind}"),
        "size=40M".into(),
        format!("block-size={block}"),
    ])
    .unwrap();
    let size = d.info().size;
    assert!(size >= 40 << 20);
    let mut model = vec![0u8; size as usize];
    for (k, (off, len)) in [
        (0u64, 4096usize),
        (1 << 20, 1 << 20),
        (3 << 20, 512),
        (7 << 20, 3 << 20),
        (size - 8192, 8192),
        (1 << 20, 4096),
    ]
    .into_iter()
    .enumerate()
    {
        let data = pattern(k as u64 + 1, len);
        write(&d, off, &data);
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    d.flush().unwrap();
    assert!(read(&d, 0, size as usize) == model);
    drop(d);
    std::fs::write(&raw, &model).unwrap();
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "vpc",
            "-F",
            "raw",
            i,
            raw.to_str().unwrap(),
        ],
    );
    let info = run("qemu-img", &["info", "-f", "vpc", "--output=json", i]);
    assert!(
        info.contains(&format!("\"virtual-size\": {size}")),
        "{info}"
    );
    // Reopen through the plugin: metadata survives.
    let d = open_path(&img).unwrap();
    assert!(read(&d, 0, size as usize) == model);
}

#[test]
fn plugin_dynamic_written_passes_qemu_compare() {
    plugin_written_passes_qemu("dynamic", "2M");
}

#[test]
fn plugin_dynamic_small_blocks_pass_qemu_compare() {
    plugin_written_passes_qemu("dynamic", "512K");
}

#[test]
fn plugin_fixed_written_passes_qemu_compare() {
    plugin_written_passes_qemu("fixed", "2M");
}
