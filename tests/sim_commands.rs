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
