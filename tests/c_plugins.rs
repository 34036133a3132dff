//! Plugins written in C (plugin-api/include/xen_disk_plugin.h), built here with `cc`: the
//! example C plugin loads like a Rust one (by name, `plugins inspect`, `check`, `sim`,
//! `bench`, under `cow`, hot-swapped to and from), and a C plugin's hostile answers become
//! an I/O error for that request.

mod common;
#[path = "support/build.rs"]
mod support;
use common::*;
use std::sync::Arc;
use xen_disk_host::plugin::{load, open_stack, GuardedDisk};
use xen_disk_host::simulation::SimulatedDisk;
use xen_disk_plugin_api::{with_read_bufs, with_write_bufs, Config, Disk, ErrorKind};

fn cfile() -> std::path::PathBuf {
    support::cc_plugin("examples/c-file-plugin/cfile.c", "cfile", &[])
}

fn run_ok(args: &[&str]) -> String {
    let o = host(args);
    assert!(o.status.success(), "{args:?}: {}{}", stdout(&o), stderr(&o));
    stdout(&o)
}

fn image(t: &TempDir, name: &str, len: u64) -> std::path::PathBuf {
    let p = t.join(name);
    std::fs::File::create(&p).unwrap().set_len(len).unwrap();
    p
}

#[test]
fn the_example_c_plugin_is_found_by_name_and_passes_check() {
    cfile();
    let out = run_ok(&["plugins", "inspect", "cfile"]);
    assert!(out.contains("abi version: 1.1 (C)\n"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains("path") && l.contains("required")),
        "{out}"
    );
    let listed = run_ok(&["plugins"]);
    assert!(listed.lines().any(|l| l.starts_with("cfile ")), "{listed}");
    // Bad input reaches the user as for a Rust plugin: one line naming the key or the file.
    assert_bad_input(
        &host(&["check", "cfile", "-c", "path=/nonexistent/x.img"]),
        &["plugin cfile", "/nonexistent/x.img", "No such file"],
    );
    assert_bad_input(
        &host(&["check", "cfile", "-c", "size=1G"]),
        &["`size`", "unknown key for plugin cfile"],
    );
    let t = TempDir::new("cfile-check");
    let img = image(&t, "d.img", 32 << 20);
    let path = format!("path={}", img.display());
    let out = run_ok(&["check", "--destructive", "cfile", "-c", &path]);
    assert!(
        out.contains("check: 11 passed, 0 failed, 0 skipped"),
        "{out}"
    );
    // Read-only: the host's convention for a `readonly` key holds for C plugins too.
    let out = run_ok(&["check", "cfile", "-c", &path, "-c", "readonly=true"]);
    assert!(
        out.contains("read-only") && out.contains(" 0 failed"),
        "{out}"
    );
}

#[test]
fn the_example_c_plugin_serves_sim_write_and_read_byte_identical() {
    cfile();
    let t = TempDir::new("cfile-sim");
    let img = image(&t, "d.img", 64 << 20);
    let (input, output) = (t.join("in"), t.join("out"));
    random_file(&input, 64 << 20, 11);
    let path = format!("path={}", img.display());
    run_ok(&[
        "sim",
        "write",
        "cfile",
        "-c",
        &path,
        "--in",
        input.to_str().unwrap(),
    ]);
    run_ok(&[
        "sim",
        "read",
        "cfile",
        "-c",
        &path,
        "--out",
        output.to_str().unwrap(),
    ]);
    let want = std::fs::read(&input).unwrap();
    assert!(std::fs::read(&output).unwrap() == want, "sim read differs");
    assert!(std::fs::read(&img).unwrap() == want, "the image differs");
}

#[test]
fn the_example_c_plugin_is_a_base_under_cow_which_never_writes_it() {
    cfile();
    let t = TempDir::new("cfile-cow");
    let base = t.join("base.img");
    random_file(&base, 8 << 20, 3);
    let gold = std::fs::read(&base).unwrap();
    let (input, output, overlay) = (t.join("in"), t.join("out"), t.join("o.cow"));
    random_file(&input, 3 << 20, 4);
    let ov = format!("overlay={}", overlay.display());
    let bp = format!("base.path={}", base.display());
    let cow = ["-c", &ov, "-c", "base=cfile", "-c", &bp];
    let mut w = vec!["sim", "write", "cow"];
    w.extend(cow);
    w.extend(["--in", input.to_str().unwrap()]);
    run_ok(&w);
    let mut r = vec!["sim", "read", "cow"];
    r.extend(cow);
    r.extend(["--out", output.to_str().unwrap()]);
    run_ok(&r);
    let mut want = gold.clone();
    want[..3 << 20].copy_from_slice(&std::fs::read(&input).unwrap());
    assert!(
        std::fs::read(&output).unwrap() == want,
        "cow over cfile reads wrong"
    );
    assert!(
        std::fs::read(&base).unwrap() == gold,
        "cow wrote its C base"
    );
    let mut c = vec!["check", "--destructive", "cow"];
    c.extend(cow);
    let out = run_ok(&c);
    assert!(
        out.contains("cow 0.1.0 over cfile 1.0.0") && out.contains(" 0 failed"),
        "{out}"
    );
}

fn open(spec: &str, pairs: &[String]) -> Box<dyn Disk> {
    let stack = open_stack(spec, &Config::from_pairs(pairs).unwrap())
        .unwrap_or_else(|e| panic!("{spec}: {e}"));
    Box::new(stack.disk)
}

#[test]
fn a_disk_swaps_from_rust_to_c_and_back_under_a_verified_guest() {
    let c = cfile();
    let file = plugin_path("file");
    let t = TempDir::new("cfile-swap");
    let img = t.join("d.img");
    random_file(&img, 8 << 20, 9);
    let mut model = std::fs::read(&img).unwrap();
    let path = vec![format!("path={}", img.display())];
    let disk = Arc::new(GuardedDisk::new(open(file.to_str().unwrap(), &path), false).unwrap());
    let mut sim = SimulatedDisk::start(disk.clone()).unwrap();
    for i in 0..8u64 {
        let next = if i % 2 == 0 { &c } else { &file };
        disk.swap(open(next.to_str().unwrap(), &path), false)
            .unwrap_or_else(|e| panic!("swap {i}: {e}"));
        let at = (i * 777 * 512) % ((8 << 20) - (64 << 10));
        let data: Vec<u8> = (0..64 << 10).map(|b| (b as u64 * 31 + i) as u8).collect();
        sim.write(at, &data).unwrap();
        model[at as usize..][..data.len()].copy_from_slice(&data);
        let mut back = vec![0u8; 8 << 20];
        sim.read(0, &mut back).unwrap();
        assert!(
            back == model,
            "after swap {i} the disk differs from the model"
        );
    }
    sim.flush().unwrap();
    sim.shutdown().unwrap();
    assert!(std::fs::read(&img).unwrap() == model, "the image differs");
}

#[test]
fn bench_direct_runs_a_c_plugin_and_sets_it_beside_its_rust_twin() {
    cfile();
    support::cc_plugin("examples/c-null-plugin/cnull.c", "cnull", &[]);
    let t = TempDir::new("cfile-bench");
    let img = image(&t, "d.img", 16 << 20);
    let path = format!("path={}", img.display());
    let out = run_ok(&[
        "bench",
        "--direct",
        "cfile",
        "-c",
        &path,
        "--rw",
        "randread",
        "--seconds",
        "0.2",
    ]);
    assert!(
        out.contains("cfile randread") && out.contains("ns/op"),
        "{out}"
    );
    let out = run_ok(&[
        "bench",
        "--direct",
        "discard",
        "--against",
        "cnull",
        "--rw",
        "randread",
        "--bs",
        "512",
        "--seconds",
        "0.2",
        "--json",
    ]);
    assert!(
        out.contains("\"against\":\"cnull (C)\"") && json_number(&out, "against_ns_per_op") > 0.0,
        "{out}"
    );
}

/// The hostile fixture, opened straight through the loader with `mode`.
fn cbad(mode: &str) -> Result<Box<dyn Disk>, String> {
    let so = support::cc_plugin("tests/fixtures/c-bad/bad.c", "cbad", &[]);
    let p = load(&so).unwrap();
    p.open(&Config::from_pairs(&[format!("mode={mode}")]).unwrap())
        .map(|d| Box::new(d) as Box<dyn Disk>)
        .map_err(|e| e.to_string())
}

#[test]
fn hostile_answers_from_c_callbacks_fail_that_request_with_eio() {
    let ok = cbad("ok").unwrap();
    with_write_bufs(&[&[7u8; 4096]], |b| ok.write(0, b)).unwrap();
    let mut buf = [0u8; 4096];
    with_read_bufs(&mut [&mut buf], |b| ok.read(0, b)).unwrap();
    assert_eq!(buf, [7u8; 4096]);

    for (mode, needle) in [
        ("short", "returned 4095, not 4096 bytes"),
        ("long", "returned 4608, not 4096 bytes"),
        ("unknown", "unknown error code -99999"),
    ] {
        let d = cbad(mode).unwrap();
        let mut buf = [0u8; 4096];
        let e = with_read_bufs(&mut [&mut buf], |b| d.read(0, b)).unwrap_err();
        assert_eq!(
            (e.kind(), e.errno()),
            (ErrorKind::Io, libc::EIO),
            "{mode}: {e}"
        );
        assert!(
            e.message().contains(needle) && e.message().contains("pread"),
            "{mode}: {e}"
        );
        let e = with_write_bufs(&[&buf], |b| d.write(0, b)).unwrap_err();
        assert_eq!(
            (e.kind(), e.errno()),
            (ErrorKind::Io, libc::EIO),
            "{mode}: {e}"
        );
        assert!(
            e.message().contains(needle) && e.message().contains("pwrite"),
            "{mode}: {e}"
        );
    }
    let d = cbad("unknown").unwrap();
    let e = d.flush().unwrap_err();
    assert!(e.message().contains("unknown error code 7"), "{e}");
    let e = d.discard(0, 4096).unwrap_err();
    assert!(e.message().contains("unknown error code -4096"), "{e}");
    assert_eq!(e.errno(), libc::EIO);

    let e = cbad("null").err().unwrap();
    assert!(
        e.contains("plugin cbad") && e.contains("open returned NULL"),
        "{e}"
    );

    // Through the whole host: check reports the failures, exits 1, and nothing panics.
    let o = host(&["check", "--destructive", "cbad", "-c", "mode=short"]);
    assert_eq!(o.status.code(), Some(1), "{}{}", stdout(&o), stderr(&o));
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    // A guest's read of a short answer gets an error, never the bytes.
    let t = TempDir::new("cbad-sim");
    let out = t.join("out");
    let o = host(&[
        "sim",
        "read",
        "cbad",
        "-c",
        "mode=short",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_ne!(o.status.code(), Some(0));
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
}

#[test]
fn a_c_plugin_struct_without_a_name_or_of_another_major_is_refused_in_one_line() {
    let so = support::cc_plugin(
        "tests/fixtures/c-bad/bad.c",
        "cbad_noname",
        &["-DNULL_NAME"],
    );
    assert_bad_input(
        &host(&["plugins", "inspect", so.to_str().unwrap()]),
        &["libcbad_noname.so", "C plugin refused", "`name` is NULL"],
    );
    let so = support::cc_plugin("tests/fixtures/c-bad/bad.c", "cbad_2_0", &["-DMAJOR_2"]);
    assert_bad_input(
        &host(&["check", so.to_str().unwrap()]),
        &[
            "libcbad_2_0.so",
            "built for C plugin API 2.0",
            "this host speaks 1.1",
        ],
    );
}

#[test]
fn the_guides_one_page_plugin_compiles_and_passes_check() {
    // The first C block of docs/c-plugins.md, exactly as a reader would copy it.
    let guide = std::fs::read_to_string(support::repo().join("docs/c-plugins.md")).unwrap();
    let code = guide
        .split("```c\n")
        .nth(1)
        .and_then(|rest| rest.split("\n```").next())
        .expect("a ```c block in docs/c-plugins.md");
    let dir = target_dir().join("c-guide");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cram.c"), code).unwrap();
    let src = dir.join("cram.c");
    let so = support::cc_plugin(src.to_str().unwrap(), "cram", &[]);
    let out = run_ok(&[
        "check",
        "--destructive",
        so.to_str().unwrap(),
        "-c",
        "size=16M",
    ]);
    assert!(out.contains(" 0 failed"), "{out}");
}

#[test]
fn a_c_struct_is_read_as_far_as_its_size_says_and_no_further() {
    use xen_disk_host::backend::features::{Advertisement, HostOffer};
    let keys = |so: &std::path::Path| {
        let d = load(so).unwrap().open(&Config::new()).unwrap();
        let g = GuardedDisk::new(Box::new(d), false).unwrap();
        let k = Advertisement::new(&HostOffer::standard(1, 1), &g.info()).connect_keys();
        let get = |n: &str| k.iter().find(|(k, _)| *k == n).unwrap().1.clone();
        (get("discard-granularity"), get("discard-alignment"))
    };
    // API 1.1: the plugin's discard granularity and alignment reach the guest.
    let v11 = support::cc_plugin("tests/fixtures/c-bad/bad.c", "cbad", &[]);
    assert_eq!(keys(&v11), ("8192".into(), "4096".into()));
    // The same fields set in a struct that says it is API 1.0's size: absent to the host.
    let v10 = support::cc_plugin("tests/fixtures/c-bad/bad.c", "cbad_1_0", &["-DSIZE_1_0"]);
    let out = run_ok(&["plugins", "inspect", v10.to_str().unwrap()]);
    assert!(out.contains("abi version: 1.0 (C)"), "{out}");
    assert_eq!(keys(&v10), ("512".into(), "0".into()));
}
