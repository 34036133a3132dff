//! The shipped plugins (discard, mmap, file) and the example plugin, through their `.so`
//! files: the conformance suite in every mode, what each promises about the image file, and
//! one clear line for every bad image.

mod common;
use common::*;
use std::os::unix::fs::MetadataExt;
use xen_disk_host::plugin::{load, GuardedDisk};
use xen_disk_plugin_api::{with_read_bufs, with_write_bufs, Config, ErrorKind};

fn open(plugin: &str, pairs: &[String]) -> GuardedDisk {
    let p = load(&plugin_path(plugin)).unwrap();
    let disk = p.open(&Config::from_pairs(pairs).unwrap()).unwrap();
    GuardedDisk::new(Box::new(disk), false).unwrap()
}

fn check_passes(args: &[&str]) -> String {
    // The images here are scratch copies: the write cases run too.
    let mut all = vec!["check", "--destructive"];
    all.extend_from_slice(args);
    let o = host(&all);
    let out = stdout(&o);
    assert!(
        o.status.success(),
        "check {args:?} failed:\n{out}{}",
        stderr(&o)
    );
    assert!(out.contains(" 0 failed"), "{out}");
    out
}

#[test]
fn check_passes_on_every_shipped_plugin_and_mode() {
    let t = TempDir::new("shipped");
    let img = t.join("disk.img");
    random_file(&img, 32 << 20, 1);
    let path = format!("path={}", img.display());
    check_passes(&["discard", "--no-data"]);
    check_passes(&["mmap", "-c", &path]);
    check_passes(&["mmap", "-c", &path, "-c", "shared=false"]);
    let out = check_passes(&["file", "-c", &path]);
    assert!(
        out.contains("ok    discard"),
        "file should discard on this filesystem: {out}"
    );
    check_passes(&["file", "-c", &path, "-c", "direct=true"]);
    let out = check_passes(&["file", "-c", &path, "-c", "readonly=true"]);
    assert!(out.contains("read-only"), "{out}");
    check_passes(&["ramdisk", "-c", "size=16M"]);
}

#[test]
fn mmap_copy_on_write_never_changes_the_image() {
    let t = TempDir::new("cow");
    let img = t.join("gold.img");
    random_file(&img, 8 << 20, 2);
    let before = std::fs::read(&img).unwrap();
    {
        let d = open(
            "mmap",
            &[format!("path={}", img.display()), "shared=false".into()],
        );
        assert!(!d.can_flush(), "copy-on-write has nothing to flush");
        let data = vec![0x5Au8; 64 * 1024];
        for i in 0..100u64 {
            with_write_bufs(&[&data], |b| d.write(i * 65536, b, false)).unwrap();
        }
        // The session sees its writes...
        let mut back = vec![0u8; 64 * 1024];
        with_read_bufs(&mut [&mut back], |b| d.read(99 * 65536, b)).unwrap();
        assert_eq!(back, data);
    }
    // ...and the image is byte for byte what it was.
    assert!(std::fs::read(&img).unwrap() == before, "the image changed");
    // The image was never opened for writing: a read-only file works too.
    let mut perms = std::fs::metadata(&img).unwrap().permissions();
    perms.set_readonly(true);
    std::fs::set_permissions(&img, perms).unwrap();
    let o = host(&[
        "check",
        "mmap",
        "-c",
        &format!("path={}", img.display()),
        "-c",
        "shared=false",
    ]);
    assert!(o.status.success(), "{}", stdout(&o));
    assert!(std::fs::read(&img).unwrap() == before);
}

#[test]
fn mmap_shared_and_file_writes_reach_the_image() {
    for plugin in ["mmap", "file"] {
        let t = TempDir::new(plugin);
        let img = t.join("disk.img");
        random_file(&img, 4 << 20, 3);
        {
            let d = open(plugin, &[format!("path={}", img.display())]);
            let data: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
            with_write_bufs(&[&data[..4096], &data[4096..]], |b| {
                d.write(1 << 20, b, false)
            })
            .unwrap();
            d.flush().unwrap();
        }
        let image = std::fs::read(&img).unwrap();
        let want: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
        assert_eq!(&image[1 << 20..(1 << 20) + 8192], &want[..], "{plugin}");
    }
}

#[test]
fn file_discard_punches_holes() {
    let t = TempDir::new("punch");
    let img = t.join("disk.img");
    random_file(&img, 16 << 20, 4);
    let before = std::fs::metadata(&img).unwrap().blocks();
    let d = open("file", &[format!("path={}", img.display())]);
    assert!(d.can_discard());
    d.discard(0, 8 << 20).unwrap();
    d.flush().unwrap();
    let after = std::fs::metadata(&img).unwrap().blocks();
    assert!(
        after * 512 <= before * 512 - (7 << 20),
        "blocks {before} -> {after}"
    );
    let mut back = vec![1u8; 4096];
    with_read_bufs(&mut [&mut back], |b| d.read(4096, b)).unwrap();
    assert!(back.iter().all(|&b| b == 0));
    assert_eq!(
        std::fs::metadata(&img).unwrap().len(),
        16 << 20,
        "size kept"
    );
}

#[test]
fn file_direct_round_trips_buffers_not_aligned_to_a_page() {
    let t = TempDir::new("direct");
    let img = t.join("disk.img");
    random_file(&img, 4 << 20, 5);
    let d = open(
        "file",
        &[format!("path={}", img.display()), "direct=true".into()],
    );
    // A guest segment can start 512 bytes into its page: build such buffers on purpose.
    let mut page = vec![0u8; 3 * 4096];
    let base = page.as_ptr() as usize;
    let start = (4096 - base % 4096) % 4096 + 512;
    let data: Vec<u8> = (0..2048u32).map(|i| (i % 251) as u8).collect();
    page[start..start + 2048].copy_from_slice(&data);
    with_write_bufs(
        &[
            &page[start..start + 1024],
            &page[start + 1024..start + 2048],
        ],
        |b| d.write(8192, b, false),
    )
    .unwrap();
    let mut back = vec![0u8; 4096 + 1024 + 2048];
    let s2 = (4096 - back.as_ptr() as usize % 4096) % 4096 + 1024;
    with_read_bufs(&mut [&mut back[s2..s2 + 2048]], |b| d.read(8192, b)).unwrap();
    assert_eq!(&back[s2..s2 + 2048], &data[..]);
    drop(d);
    assert_eq!(&std::fs::read(&img).unwrap()[8192..8192 + 2048], &data[..]);
}

#[test]
fn file_readonly_refuses_writes_and_leaves_the_image() {
    let t = TempDir::new("ro");
    let img = t.join("disk.img");
    random_file(&img, 1 << 20, 6);
    let before = std::fs::read(&img).unwrap();
    let d = open(
        "file",
        &[format!("path={}", img.display()), "readonly=true".into()],
    );
    assert!(d.info().read_only);
    let e = with_write_bufs(&[&[0u8; 512]], |b| d.write(0, b, false)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReadOnly);
    assert!(!d.can_discard());
    assert!(std::fs::read(&img).unwrap() == before);
}

#[test]
fn bad_images_are_one_line_naming_the_file() {
    let t = TempDir::new("bad");
    let empty = t.join("empty.img");
    std::fs::write(&empty, b"").unwrap();
    let odd = t.join("odd.img");
    std::fs::write(&odd, vec![0u8; 1000]).unwrap();
    let missing = t.join("missing.img");
    for plugin in ["mmap", "file"] {
        let arg = |p: &std::path::Path| format!("path={}", p.display());
        assert_bad_input(
            &host(&["check", plugin, "-c", &arg(&missing)]),
            &["missing.img", "No such file"],
        );
        assert_bad_input(
            &host(&["check", plugin, "-c", &arg(&empty)]),
            &["empty.img", "empty"],
        );
        assert_bad_input(
            &host(&["check", plugin, "-c", &arg(&odd)]),
            &["odd.img", "1000 bytes", "multiple of 512"],
        );
        assert_bad_input(
            &host(&["check", plugin, "-c", &arg(&t.0)]),
            &["is a directory"],
        );
        assert_bad_input(&host(&["check", plugin]), &["`path`", "required"]);
    }
}

#[test]
fn qcow2_passes_check_on_a_qemu_image_and_leaves_it_clean_for_qemu() {
    let t = TempDir::new("qcow2");
    let img = t.join("disk.qcow2");
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "64M"])
        .status()
        .expect("qemu-img (package qemu-utils) is needed");
    assert!(made.success());
    check_passes(&["qcow2", "-c", &format!("path={}", img.display())]);
    let checked = std::process::Command::new("qemu-img")
        .args(["check", "-q", img.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(
        checked.success(),
        "qemu-img check finds the image damaged after the conformance workload"
    );
}

#[test]
fn vhd_passes_check_on_qemu_and_plugin_made_images() {
    let t = TempDir::new("vhd");
    let img = t.join("disk.vhd");
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "vpc", img.to_str().unwrap(), "64M"])
        .status()
        .expect("qemu-img (package qemu-utils) is needed");
    assert!(made.success());
    let out = check_passes(&["vhd", "-c", &format!("path={}", img.display())]);
    assert!(
        out.contains("ok    discard") && out.contains("write-zeroes  7 KiB zeroed (native)"),
        "VHD discards and zeroes natively: {out}"
    );
    let fixed = t.join("fixed.vhd");
    check_passes(&[
        "vhd",
        "-c",
        &format!("path={}", fixed.display()),
        "-c",
        "create=fixed",
        "-c",
        "size=32M",
    ]);
    // A differencing chain of depth 3, made by the plugin's own create: the suite runs on
    // its top, over parents that already hold data.
    let base = t.join("base.vhd");
    let fill = t.join("fill.bin");
    std::fs::write(&fill, vec![0x5a; 3 << 20]).unwrap();
    let out = host(&[
        "sim",
        "write",
        "vhd",
        "-c",
        &format!("path={}", base.display()),
        "-c",
        "create=dynamic",
        "-c",
        "size=32M",
        "--in",
        fill.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut parent = base;
    for name in ["mid.vhd", "top.vhd"] {
        let child = t.join(name);
        let config = [
            format!("path={}", child.display()),
            "create=differencing".into(),
            format!("parent={}", parent.display()),
        ];
        if name == "top.vhd" {
            let out = check_passes(&["vhd", "-c", &config[0], "-c", &config[1], "-c", &config[2]]);
            assert!(out.contains("check: 11 passed, 0 failed"), "{out}");
        } else {
            let out = host(&[
                "sim",
                "write",
                "vhd",
                "-c",
                &config[0],
                "-c",
                &config[1],
                "-c",
                &config[2],
                "--in",
                fill.to_str().unwrap(),
            ]);
            assert!(out.status.success(), "{}", stderr(&out));
        }
        parent = child;
    }
}
