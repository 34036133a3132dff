//! `sim write` and `sim read`: a simulated guest moves a whole disk through the full path —
//! xenstore handshake, the device, the ring, grants, the plugin `.so` — and the bytes survive.

mod common;
use common::*;

#[test]
fn sim_write_then_sim_read_round_trips_256_mib_through_the_file_plugin() {
    let t = TempDir::new("simrw");
    let (img, input, output) = (t.join("disk.img"), t.join("in.bin"), t.join("out.bin"));
    std::fs::File::create(&img)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    random_file(&input, 256 << 20, 42);
    let path = format!("path={}", img.display());
    let o = host(&[
        "sim",
        "write",
        "file",
        "-c",
        &path,
        "--in",
        input.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).starts_with("wrote 268435456 bytes"),
        "{}",
        stdout(&o)
    );
    let o = host(&[
        "sim",
        "read",
        "file",
        "-c",
        &path,
        "--out",
        output.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("MB/s"), "{}", stdout(&o));
    let want = std::fs::read(&input).unwrap();
    assert!(
        std::fs::read(&output).unwrap() == want,
        "sim read differs from what sim write wrote"
    );
    assert!(
        std::fs::read(&img).unwrap() == want,
        "the image does not hold what was written"
    );
}

#[test]
fn copy_on_write_mmap_keeps_the_image_and_4k_sectors_store_data() {
    let t = TempDir::new("simcow");
    let (img, input, output) = (t.join("gold.img"), t.join("in.bin"), t.join("out.bin"));
    random_file(&img, 8 << 20, 1);
    let before = std::fs::read(&img).unwrap();
    random_file(&input, 3 << 20, 2);
    // mmap shared=false: the write lands in the session only; the image is untouched.
    let path = format!("path={}", img.display());
    let o = host(&[
        "sim",
        "write",
        "mmap",
        "-c",
        &path,
        "-c",
        "shared=false",
        "--in",
        input.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(std::fs::read(&img).unwrap() == before);
    // 4096-byte sectors that store data: a cow overlay over a 4096-byte-sector base (cow
    // takes its base's sector size). A pattern written through them reads back.
    let overlay = format!("overlay={}", t.join("4k.cow").display());
    let disk = [
        "cow",
        "-c",
        &overlay,
        "-c",
        "base=discard",
        "-c",
        "base.size=8M",
        "-c",
        "base.sector-size=4096",
    ];
    let o = host(
        &[
            &["sim", "write"],
            &disk[..],
            &["--in", input.to_str().unwrap()],
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = host(
        &[
            &["sim", "read"],
            &disk[..],
            &["--out", output.to_str().unwrap()],
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let back = std::fs::read(&output).unwrap();
    assert_eq!(back.len(), 8 << 20);
    assert!(
        back[..3 << 20] == std::fs::read(&input).unwrap()[..],
        "what was written through 4096-byte sectors does not read back"
    );
    // They are 4096 bytes: a write that ends 512 bytes into a sector is refused.
    let odd = t.join("odd.bin");
    random_file(&odd, (3 << 20) + 512, 3);
    let overlay = format!("overlay={}", t.join("4k-odd.cow").display());
    let mut odd_disk = disk;
    odd_disk[2] = &overlay;
    let o = host(
        &[
            &["sim", "write"],
            &odd_disk[..],
            &["--in", odd.to_str().unwrap()],
        ]
        .concat(),
    );
    assert!(
        !o.status.success(),
        "a write of 3 MiB + 512 bytes to 4096-byte sectors passed"
    );
}

#[test]
fn sim_mistakes_are_one_line() {
    let t = TempDir::new("simbad");
    let big = t.join("big.bin");
    random_file(&big, 2 << 20, 3);
    let o = host(&[
        "sim",
        "write",
        "discard",
        "-c",
        "size=1M",
        "--in",
        big.to_str().unwrap(),
    ]);
    assert_bad_input(&o, &["big.bin", "do not fit"]);
    let o = host(&[
        "sim",
        "write",
        "discard",
        "--in",
        t.join("missing.bin").to_str().unwrap(),
    ]);
    assert_bad_input(&o, &["missing.bin"]);
    assert_bad_input(
        &host(&["sim", "read", "nope", "--out", "/dev/null"]),
        &["libnope.so"],
    );
}

#[test]
fn an_image_the_host_cannot_write_is_read_by_sim_read_and_the_error_names_the_key() {
    let t = TempDir::new("simro");
    let (raw, qcow2, vhd) = (t.join("ro.img"), t.join("ro.qcow2"), t.join("ro.vhd"));
    let (input, output) = (t.join("in.bin"), t.join("out.bin"));
    random_file(&raw, 1 << 20, 5);
    random_file(&input, 64 << 10, 6);
    let want = std::fs::read(&raw).unwrap();
    let at = |p: &std::path::Path| format!("path={}", p.display());
    for (plugin, path, create) in [
        ("qcow2", &qcow2, ["create=true", "size=1M"]),
        ("vhd", &vhd, ["create=dynamic", "size=1M"]),
    ] {
        let o = host(&[
            "sim",
            "write",
            plugin,
            "-c",
            &at(path),
            "-c",
            create[0],
            "-c",
            create[1],
            "--in",
            input.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{plugin}: {}", stderr(&o));
    }
    std::fs::set_permissions(&raw, std::os::unix::fs::PermissionsExt::from_mode(0o444)).unwrap();
    // Dropped (attribute removed) before the TempDir, so that the directory can go.
    let _locked: Vec<Immutable> = [&raw, &qcow2, &vhd].map(|p| Immutable::new(p)).into();

    for (plugin, path, key) in [
        ("file", &raw, "readonly=true"),
        ("mmap", &raw, "shared=false"),
        ("qcow2", &qcow2, "readonly=true"),
        ("vhd", &vhd, "readonly=true"),
    ] {
        // sim read only reads: it opens the image read-only.
        let o = host(&[
            "sim",
            "read",
            plugin,
            "-c",
            &at(path),
            "--out",
            output.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "sim read {plugin}: {}", stderr(&o));
        let got = std::fs::read(&output).unwrap();
        if plugin == "file" || plugin == "mmap" {
            assert!(got == want, "sim read {plugin} differs from the image");
        } else {
            assert!(
                got[..64 << 10] == std::fs::read(&input).unwrap()[..],
                "sim read {plugin} differs from what was written"
            );
        }
        // sim write needs write access, and the refusal says which key opens it read-only.
        let o = host(&[
            "sim",
            "write",
            plugin,
            "-c",
            &at(path),
            "--in",
            input.to_str().unwrap(),
        ]);
        assert_bad_input(
            &o,
            &[
                path.to_str().unwrap(),
                "Operation not permitted",
                &format!("(open it read-only with {key}"),
            ],
        );
    }
    // connect opens read-write unless it serves read-only.
    let o = host(&["connect", "1", "--sim", "--plugin", "file", "-c", &at(&raw)]);
    assert_bad_input(&o, &["ro.img", "(open it read-only with readonly=true)"]);
    let mut served = std::process::Command::new(target_dir().join("xen-disk-host"))
        .args(["connect", "1", "--sim", "--readonly", "--plugin", "file"])
        .args(["-c", &at(&raw)])
        .env("XEN_DISK_PLUGIN_PATH", target_dir())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(served.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut out, &mut first).unwrap();
    // SAFETY: kill(2) on the child this test started.
    unsafe { libc::kill(served.id() as i32, libc::SIGTERM) };
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let o = served.wait_with_output().unwrap();
    assert!(
        first.starts_with("attached file to a simulated guest") && rest == "detached\n",
        "connect --readonly: {first}{rest}{}",
        stderr(&o)
    );
    assert!(o.status.success(), "{:?} {}", o.status, stderr(&o));
    assert!(std::fs::read(&raw).unwrap() == want, "the image changed");
}
