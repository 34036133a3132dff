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
fn copy_on_write_mmap_keeps_the_image_and_4k_sectors_work() {
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
    // A 4096-byte-sector disk reads whole.
    let o = host(&[
        "sim",
        "read",
        "discard",
        "-c",
        "size=8M",
        "-c",
        "sector-size=4096",
        "--out",
        output.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::metadata(&output).unwrap().len(), 8 << 20);
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
