//! Interop with qemu-img / qemu-io: images made by QEMU read byte-identical through the
//! plugin (via the FFI boundary), images written by the plugin pass `qemu-img check` and
//! `qemu-img compare`, corrupt images give clear errors.

mod common;

use common::{check_clean, compare_to_raw, raw_of, run, tmpdir};
use qcow2::Qcow2Plugin;
use std::path::Path;
use std::process::Command;
use xen_disk_plugin_api::{with_read_bufs, with_write_bufs, Config, Disk, ForeignDisk};

fn open(pairs: &[String]) -> xen_disk_plugin_api::Result<ForeignDisk> {
    let cfg = Config::from_pairs(pairs).unwrap();
    ForeignDisk::open(xen_disk_plugin_api::__root_module::<Qcow2Plugin>(), &cfg)
}

fn open_path(p: &Path, ro: bool) -> ForeignDisk {
    open(&[format!("path={}", p.display()), format!("readonly={ro}")]).unwrap()
}

fn read_all(d: &ForeignDisk) -> Vec<u8> {
    let size = d.info().size as usize;
    let mut v = vec![0u8; size];
    // Odd-sized scatter-gather pieces to cross cluster boundaries.
    let mut at = 0;
    while at < size {
        let n = (size - at).min(3 * 4096 + 512 * 7);
        let (a, b) = v[at..at + n].split_at_mut(n / 2 / 512 * 512);
        with_read_bufs(&mut [a, b], |bufs| d.read(at as u64, bufs)).unwrap();
        at += n;
    }
    v
}

fn qemu_write(img: &Path, fmt: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(img.to_str().unwrap());
    run("qemu-io", &args);
}

#[test]
fn qemu_images_read_identically() {
    let d = tmpdir("read");
    for (compat, cs) in [
        ("0.10", "4k"),
        ("1.1", "64k"),
        ("1.1", "2M"),
        ("0.10", "512k"),
    ] {
        let img = d.join(format!("a-{compat}-{cs}.qcow2"));
        let _ = std::fs::remove_file(&img);
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("compat={compat},cluster_size={cs}"),
                img.to_str().unwrap(),
                "12M",
            ],
        );
        qemu_write(
            &img,
            "qcow2",
            &[
                "write -P 0x11 0 5000",
                "write -P 0x22 1M 3M",
                "write -P 0x33 11M 512",
                "write -z 2M 64k",
            ],
        );
        let disk = open_path(&img, true);
        assert_eq!(disk.info().size, 12 << 20);
        assert_eq!(read_all(&disk), raw_of(&img), "{compat} {cs}");
    }
}

#[test]
fn backing_chains_and_compressed_clusters_read_identically() {
    let d = tmpdir("chain");
    let base_raw = d.join("base.raw");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "raw",
            base_raw.to_str().unwrap(),
            "8M",
        ],
    );
    qemu_write(&base_raw, "raw", &["write -P 0xaa 0 8M"]);
    let mid = d.join("mid.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "-o",
            "cluster_size=4k",
            mid.to_str().unwrap(),
        ],
    );
    qemu_write(
        &mid,
        "qcow2",
        &["write -P 0xbb 100k 300k", "write -z 1M 8k"],
    );
    let top = d.join("top.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            mid.to_str().unwrap(),
            "-F",
            "qcow2",
            top.to_str().unwrap(),
        ],
    );
    qemu_write(
        &top,
        "qcow2",
        &["write -P 0xcc 150k 10k", "write -P 0xdd 7M 1M"],
    );
    let disk = open_path(&top, true);
    assert_eq!(read_all(&disk), raw_of(&top));

    // Compressed: convert a patterned image with -c.
    let src = d.join("src.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", src.to_str().unwrap(), "4M"],
    );
    qemu_write(
        &src,
        "qcow2",
        &["write -P 0x5a 0 1M", "write -P 0x01 2M 100k"],
    );
    let comp = d.join("comp.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=16k",
            src.to_str().unwrap(),
            comp.to_str().unwrap(),
        ],
    );
    let expect = raw_of(&comp);
    let disk = open_path(&comp, true);
    assert_eq!(read_all(&disk), expect);
    drop(disk);
    // Writing into a compressed cluster rewrites it uncompressed.
    let disk = open_path(&comp, false);
    let data = vec![0x77u8; 1000];
    with_write_bufs(&[&data], |b| disk.write(4096 + 100, b)).unwrap();
    disk.flush().unwrap();
    let mut exp = expect.clone();
    exp[4196..5196].fill(0x77);
    assert_eq!(read_all(&disk), exp);
    drop(disk);
    check_clean(&comp);
    assert_eq!(raw_of(&comp), exp);
}

#[test]
fn plugin_writes_pass_qemu_check_and_compare() {
    let d = tmpdir("write");
    for (compat, cs, order) in [
        ("1.1", "64k", 4),
        ("0.10", "4k", 4),
        ("1.1", "4k", 3),
        ("1.1", "128k", 5),
    ] {
        let img = d.join(format!("w-{compat}-{cs}-{order}.qcow2"));
        let _ = std::fs::remove_file(&img);
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!(
                    "compat={compat},cluster_size={cs},refcount_bits={}",
                    1 << order
                ),
                img.to_str().unwrap(),
                "32M",
            ],
        );
        qemu_write(&img, "qcow2", &["write -P 0x10 0 256k"]);
        let mut expect = vec![0u8; 32 << 20];
        expect[..256 << 10].fill(0x10);
        let disk = open_path(&img, false);
        let mut seed = 12345u64;
        for _ in 0..200 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let off = ((seed >> 20) % (32 << 20)) & !511;
            let len = (((seed >> 8) % 40_000) as usize + 512) & !511;
            let len = len.min((32 << 20) - off as usize);
            let byte = (seed >> 56) as u8;
            let buf = vec![byte; len];
            let (a, b) = buf.split_at(len / 2);
            with_write_bufs(&[a, b], |w| disk.write(off, w)).unwrap();
            expect[off as usize..off as usize + len].fill(byte);
        }
        if compat == "1.1" {
            disk.write_zeroes(3 << 20, 1 << 20).unwrap();
            expect[3 << 20..4 << 20].fill(0);
            disk.discard(0, 128 << 10).unwrap();
            expect[..128 << 10].fill(0);
        } else {
            disk.write_zeroes(3 << 20, 100_000).unwrap();
            expect[3 << 20..(3 << 20) + 100_000].fill(0);
        }
        disk.flush().unwrap();
        assert_eq!(read_all(&disk), expect, "{compat} {cs}");
        drop(disk);
        check_clean(&img);
        compare_to_raw(&img, &expect);
    }
}

#[test]
fn create_via_config_with_backing() {
    let d = tmpdir("create");
    let base = d.join("base.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "3M"],
    );
    qemu_write(&base, "qcow2", &["write -P 0x42 0 3M"]);
    let top = d.join("top.qcow2");
    let disk = open(&[
        format!("path={}", top.display()),
        "create=true".into(),
        "backing=base.qcow2".into(),
        "backing-format=qcow2".into(),
        "cluster-size=8K".into(),
    ])
    .unwrap();
    assert_eq!(disk.info().size, 3 << 20);
    let data = vec![0x99u8; 700];
    with_write_bufs(&[&data], |b| disk.write(8192 * 3 + 100, b)).unwrap();
    disk.flush().unwrap();
    drop(disk);
    check_clean(&top);
    let mut expect = vec![0x42u8; 3 << 20];
    expect[8192 * 3 + 100..8192 * 3 + 800].fill(0x99);
    assert_eq!(raw_of(&top), expect);
    let info = run("qemu-img", &["info", top.to_str().unwrap()]);
    assert!(info.contains("backing file format: qcow2"), "{info}");

    let fresh = d.join("fresh.qcow2");
    let disk = open(&[
        format!("path={}", fresh.display()),
        "create=true".into(),
        "size=5M".into(),
    ])
    .unwrap();
    with_write_bufs(&[&data], |b| disk.write(4 << 20, b)).unwrap();
    disk.flush().unwrap();
    drop(disk);
    check_clean(&fresh);
}

fn patch(img: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(img)
        .unwrap()
        .write_all_at(bytes, at)
        .unwrap();
}

#[test]
fn corrupt_images_give_clear_errors() {
    let d = tmpdir("corrupt");
    let fresh = |n: &str| {
        let p = d.join(n);
        let _ = std::fs::remove_file(&p);
        run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "1M"],
        );
        qemu_write(&p, "qcow2", &["write -P 1 0 64k"]);
        p
    };
    let cases: Vec<(&str, u64, Vec<u8>, &str)> = vec![
        ("magic", 0, vec![0; 4], "magic"),
        ("version", 4, 9u32.to_be_bytes().to_vec(), "version"),
        ("cbits", 20, 30u32.to_be_bytes().to_vec(), "cluster_bits"),
        ("size", 24, u64::MAX.to_be_bytes().to_vec(), "size"),
        ("crypt", 32, 1u32.to_be_bytes().to_vec(), "crypt_method"),
        (
            "l1off",
            40,
            (1u64 << 40).to_be_bytes().to_vec(),
            "l1_table_offset",
        ),
        (
            "l1unal",
            40,
            0x30001u64.to_be_bytes().to_vec(),
            "l1_table_offset",
        ),
        (
            "rtoff",
            48,
            (1u64 << 40).to_be_bytes().to_vec(),
            "refcount_table_offset",
        ),
        (
            "rtclusters",
            56,
            u32::MAX.to_be_bytes().to_vec(),
            "refcount_table_clusters",
        ),
        ("l1size", 36, u32::MAX.to_be_bytes().to_vec(), "l1_size"),
        ("extl2", 72, 16u64.to_be_bytes().to_vec(), "extended L2"),
        ("extdata", 72, 4u64.to_be_bytes().to_vec(), "external data"),
        ("rorder", 96, 7u32.to_be_bytes().to_vec(), "refcount_order"),
    ];
    for (n, at, bytes, want) in cases {
        let p = fresh(&format!("{n}.qcow2"));
        patch(&p, at, &bytes);
        let e = open(&[format!("path={}", p.display()), "readonly=true".into()])
            .err()
            .unwrap_or_else(|| panic!("{n} opened"));
        let msg = e.to_string();
        assert!(
            msg.contains(want) && msg.contains(&format!("{n}.qcow2")),
            "{n}: {msg}"
        );
    }
    // An L1 entry pointing outside the file fails the read, not the process.
    let p = fresh("l2.qcow2");
    let l1off = u64::from_be_bytes(std::fs::read(&p).unwrap()[40..48].try_into().unwrap());
    patch(&p, l1off, &((1u64 << 40) | (1 << 63)).to_be_bytes());
    let disk = open_path(&p, true);
    let mut buf = vec![0u8; 4096];
    let e = with_read_bufs(&mut [&mut buf], |b| disk.read(0, b)).unwrap_err();
    assert!(e.to_string().contains("L2 table"), "{e}");
    // Backing loop.
    let a = d.join("loopa.qcow2");
    let b = d.join("loopb.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", a.to_str().unwrap(), "1M"],
    );
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "loopa.qcow2",
            "-F",
            "qcow2",
            b.to_str().unwrap(),
        ],
    );
    std::fs::remove_file(&a).unwrap();
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "loopb.qcow2",
            "-F",
            "qcow2",
            a.to_str().unwrap(),
            "1M",
        ],
    );
    let e = open(&[format!("path={}", a.display()), "readonly=true".into()])
        .err()
        .unwrap();
    assert!(e.to_string().contains("loop"), "{e}");
    // A dirty image whose tables reference one data cluster twice cannot be repaired here.
    let p = d.join("twice.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            p.to_str().unwrap(),
            "1M",
        ],
    );
    qemu_write(&p, "qcow2", &["write -P 1 0 8k"]);
    let l1 = u64::from_be_bytes(std::fs::read(&p).unwrap()[40..48].try_into().unwrap());
    let bytes = std::fs::read(&p).unwrap();
    let l2 = u64::from_be_bytes(bytes[l1 as usize..l1 as usize + 8].try_into().unwrap())
        & 0x00ff_ffff_ffff_fe00;
    let first = bytes[l2 as usize..l2 as usize + 8].to_vec();
    patch(&p, l2 + 8, &first);
    patch(&p, 72, &1u64.to_be_bytes());
    let before = std::fs::read(&p).unwrap();
    let e = open(&[format!("path={}", p.display())]).err().unwrap();
    assert!(e.to_string().contains("referenced twice"), "{e}");
    assert!(
        std::fs::read(&p).unwrap() == before,
        "a refused repair changed the file"
    );
}

/// Lazy refcounts and a crash (qemu-io's `abort`) leave a dirty image with refcounts that
/// miss clusters. Read-only it opens as is; writable, its refcounts are rebuilt first, and
/// after more writes qemu-img finds no error and the data qemu and the plugin wrote.
#[test]
fn dirty_lazy_refcount_image_is_repaired_before_writing() {
    let dir = tmpdir("lazy");
    let img = dir.join("lazy.qcow2");
    let i = img.to_str().unwrap();
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on,cluster_size=4096",
            i,
            "8M",
        ],
    );
    // qemu-io aborts on purpose: its exit status is not success.
    let _ = Command::new("qemu-io")
        .args([
            "-c",
            "write -P 0x11 0 100k",
            "-c",
            "write -P 0x22 1M 64k",
            "-c",
            "abort",
            i,
        ])
        .output()
        .expect("qemu-io");
    let broken = Command::new("qemu-img")
        .args(["check", i])
        .output()
        .unwrap();
    assert!(!broken.status.success(), "the crash left refcount errors");
    let mut model = vec![0u8; 8 << 20];
    model[..100 << 10].fill(0x11);
    model[1 << 20..(1 << 20) + (64 << 10)].fill(0x22);

    let before = std::fs::read(&img).unwrap();
    let ro = open_path(&img, true);
    assert!(read_all(&ro) == model, "read-only view of the dirty image");
    drop(ro);
    assert!(
        std::fs::read(&img).unwrap() == before,
        "read-only open changed the image"
    );

    let d = open_path(&img, false);
    assert!(read_all(&d) == model, "after the repair");
    let data = vec![0x33u8; 3 << 20];
    with_write_bufs(&[&data], |b| d.write(2 << 20, b)).unwrap();
    model[2 << 20..5 << 20].fill(0x33);
    with_write_bufs(&[&data[..4096]], |b| d.write(0, b)).unwrap();
    model[..4096].fill(0x33);
    d.flush().unwrap();
    drop(d);
    check_clean(&img);
    assert!(
        raw_of(&img) == model,
        "qemu reads the repaired and written image"
    );
}

#[test]
fn parallel_reads_agree_with_qemu() {
    let d = tmpdir("parallel");
    let img = d.join("p.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "8M"],
    );
    qemu_write(
        &img,
        "qcow2",
        &["write -P 0x61 0 3M", "write -P 0x62 5M 2M"],
    );
    let expect = raw_of(&img);
    let disk = open_path(&img, true);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| assert_eq!(read_all(&disk), expect));
        }
    });
}

#[test]
fn out_of_range_is_an_error_and_segmented_writes_match_qemu() {
    let d = tmpdir("segments");
    let img = d.join("s.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "8M"],
    );
    let disk = open_path(&img, false);
    // Calls the host's guard would refuse, straight to the plugin: errors, not panics.
    let mut buf = vec![0u8; 4096];
    for off in [u64::MAX - 4095, u64::MAX - 511, 8 << 20, (8 << 20) - 512] {
        let e = with_read_bufs(&mut [&mut buf], |b| disk.read(off, b)).unwrap_err();
        assert_eq!(e.kind(), xen_disk_plugin_api::ErrorKind::OutOfRange, "{e}");
        let e = with_write_bufs(&[&buf], |b| disk.write(off, b)).unwrap_err();
        assert_eq!(e.kind(), xen_disk_plugin_api::ErrorKind::OutOfRange, "{e}");
    }
    // A 1 MiB write in 256 page-sized segments, starting mid-cluster.
    let pages: Vec<Vec<u8>> = (0..256u32).map(|i| vec![i as u8; 4096]).collect();
    let refs: Vec<&[u8]> = pages.iter().map(|p| p.as_slice()).collect();
    with_write_bufs(&refs, |b| disk.write(3 * 4096, b)).unwrap();
    disk.flush().unwrap();
    drop(disk);
    check_clean(&img);
    let mut expect = vec![0u8; 8 << 20];
    for (i, p) in pages.iter().enumerate() {
        expect[3 * 4096 + i * 4096..][..4096].copy_from_slice(p);
    }
    assert_eq!(raw_of(&img), expect);
}

/// A dirty image in a huge sparse file (8 TiB, almost all of it unreferenced): the rebuilt
/// refcounts cover what the tables reference, not every cluster of the file, so the repair
/// neither allocates nor writes gigabytes.
#[test]
fn dirty_image_in_a_huge_sparse_file_is_repaired_cheaply() {
    let dir = tmpdir("lazybig");
    let img = dir.join("big.qcow2");
    let i = img.to_str().unwrap();
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            i,
            "8M",
        ],
    );
    let _ = Command::new("qemu-io")
        .args(["-c", "write -P 0x11 0 100k", "-c", "abort", i])
        .output()
        .expect("qemu-io");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(8 << 40)
        .unwrap();
    let d = open_path(&img, false);
    let mut model = vec![0u8; 8 << 20];
    model[..100 << 10].fill(0x11);
    assert!(read_all(&d) == model, "after the repair");
    drop(d);
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&img).unwrap().blocks() * 512;
    assert!(allocated < 16 << 20, "the repair wrote {allocated} bytes");
    check_clean(&img);
}
