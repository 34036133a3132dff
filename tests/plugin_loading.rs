//! Loading plugins through the real `.so` boundary: the CLI's listing and inspection, and
//! every kind of bad plugin or bad configuration giving one clear line and exit code 2.

mod common;
use common::*;

#[test]
fn plugins_list_shows_the_shipped_plugins() {
    let o = host(&["plugins"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.lines()
            .any(|l| l.starts_with("discard ") && l.contains("Null disk")),
        "{out}"
    );
}

#[test]
fn inspect_shows_keys_types_defaults_and_abi() {
    let o = host(&["plugins", "inspect", "discard"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let abi = format!("abi version: 1.{}\n", xen_disk_plugin_api::ABI_MINOR);
    assert!(out.contains(&abi), "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains("size") && l.contains("default 1G")),
        "{out}"
    );
    // A path works as well as a name, and `-` is spelled `_` in the file.
    let path = plugin_path("discard");
    let o = host(&["plugins", "inspect", path.to_str().unwrap()]);
    assert!(stdout(&o).contains("name:        discard"));
}

#[test]
fn inspect_says_what_is_a_filter_and_that_it_takes_a_base() {
    let out = stdout(&host(&["plugins", "inspect", "discard"]));
    assert!(out.contains("kind:        disk"), "{out}");
    assert!(
        !out.lines().any(|l| l.trim_start().starts_with("base ")),
        "{out}"
    );
    let o = host(&["plugins", "inspect", "delay"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("kind:        filter, opened over a base disk\n"),
        "{out}"
    );
    assert!(
        out.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.starts_with(&["base", "plugin", "required"]) && l.contains("base.KEY=VALUE")
        }),
        "{out}"
    );
    // cow never writes its base, and says so.
    let out = stdout(&host(&["plugins", "inspect", "cow"]));
    assert!(
        out.contains("kind:        filter, opened over a base disk (which it never writes"),
        "{out}"
    );
}

#[test]
fn a_library_that_is_not_a_plugin_is_refused() {
    let libz = "/lib/x86_64-linux-gnu/libz.so.1";
    assert!(
        std::path::Path::new(libz).exists(),
        "{libz} is needed for this test"
    );
    assert_bad_input(&host(&["check", libz]), &[libz, "not a xen-disk plugin"]);
    assert_bad_input(
        &host(&["plugins", "inspect", libz]),
        &[libz, "not a xen-disk plugin"],
    );
}

#[test]
fn a_plugin_built_for_another_abi_version_is_refused_naming_both() {
    let p = plugin_path("test-wrong-abi");
    let o = host(&["check", p.to_str().unwrap()]);
    let host_version = format!("ABI 1.{}", xen_disk_plugin_api::ABI_MINOR);
    assert_bad_input(&o, &["libtest_wrong_abi.so", "ABI 2.0", &host_version]);
}

#[test]
fn missing_plugins_and_files_are_named() {
    assert_bad_input(
        &host(&["check", "no-such-plugin"]),
        &["libno_such_plugin.so"],
    );
    assert_bad_input(
        &host(&["check", "./nowhere/libx.so"]),
        &["./nowhere/libx.so", "no such file"],
    );
    let t = TempDir::new("notelf");
    let junk = t.join("libjunk.so");
    std::fs::write(&junk, b"not an ELF file").unwrap();
    assert_bad_input(
        &host(&["check", junk.to_str().unwrap()]),
        &["libjunk.so", "cannot load"],
    );
}

#[test]
fn unknown_and_ill_typed_config_keys_are_named() {
    assert_bad_input(
        &host(&["check", "discard", "-c", "sise=1G"]),
        &["`sise`", "size, sector-size"],
    );
    assert_bad_input(
        &host(&["check", "discard", "-c", "size=lots"]),
        &["`size`", "lots"],
    );
    assert_bad_input(
        &host(&["check", "discard", "-c", "sector-size=yes"]),
        &["`sector-size`"],
    );
    assert_bad_input(&host(&["check", "discard", "-c", "size"]), &["key=value"]);
    assert_bad_input(
        &host(&["check", "discard", "-c", "size=1000"]),
        &["`size`", "multiple of 512"],
    );
}

#[test]
fn discard_passes_check_and_the_check_catches_a_disk_that_stores_nothing() {
    let o = host(&["check", "discard", "--no-data", "--destructive"]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).contains("check: 11 passed, 0 failed"),
        "{}",
        stdout(&o)
    );
    // Without --no-data the read-back comparisons must notice that nothing was stored.
    let o = host(&["check", "discard", "--destructive"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("FAIL  pattern"), "{}", stdout(&o));
    let o = host(&[
        "check",
        "discard",
        "-c",
        "sector-size=4096",
        "--no-data",
        "--destructive",
    ]);
    assert!(o.status.success(), "{}", stdout(&o));
}

#[test]
fn a_toml_plugin_config_table_and_cli_pairs_configure_alike() {
    let t = TempDir::new("cfg");
    let f = t.join("disk.toml");
    std::fs::write(&f, "[plugin-config]\nsize = \"64M\"\nsector-size = 4096\n").unwrap();
    let o = host(&[
        "check",
        "discard",
        "--no-data",
        "--config-file",
        f.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).contains("67108864 bytes, sectors 4096/4096"),
        "{}",
        stdout(&o)
    );
    // -c overrides the file.
    let o = host(&[
        "check",
        "discard",
        "--no-data",
        "--config-file",
        f.to_str().unwrap(),
        "-c",
        "size=32M",
    ]);
    assert!(stdout(&o).contains("33554432 bytes"), "{}", stdout(&o));
    // A bad file is one line naming it.
    std::fs::write(&f, "[plugin-config\n").unwrap();
    assert_bad_input(
        &host(&["check", "discard", "--config-file", f.to_str().unwrap()]),
        &["disk.toml", "TOML"],
    );
    std::fs::write(&f, "size = 1\n").unwrap();
    assert_bad_input(
        &host(&["check", "discard", "--config-file", f.to_str().unwrap()]),
        &["disk.toml", "[plugin-config]"],
    );
    std::fs::write(&f, "[plugin-config]\nsize = true\n").unwrap();
    assert_bad_input(
        &host(&["check", "discard", "--config-file", f.to_str().unwrap()]),
        &["`size`"],
    );
}

#[test]
fn bench_direct_reports_figures_beside_memcpy() {
    let o = host(&[
        "bench",
        "--direct",
        "discard",
        "--rw",
        "randread",
        "--bs",
        "4k",
        "--seconds",
        "0.3",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for key in [
        "\"iops\":",
        "\"mbps\":",
        "\"lat_p50_us\":",
        "\"lat_p99_us\":",
        "\"memcpy_mbps\":",
    ] {
        assert!(out.contains(key), "{key} missing: {out}");
    }
    let field = |k: &str| json_number(&out, k);
    assert!(field("ops") > 1000.0 && field("memcpy_mbps") > 0.0, "{out}");
    assert_bad_input(
        &host(&["bench", "--direct", "discard", "--bs", "1000"]),
        &["--bs"],
    );
    assert_bad_input(
        &host(&["bench", "discard", "--iodepth", "0"]),
        &["--iodepth"],
    );
    assert_bad_input(
        &host(&["bench", "discard", "--bs", "6k"]),
        &["multiples of 4k"],
    );
}

#[test]
fn bench_direct_runs_qemu_img_on_the_same_image() {
    let t = TempDir::new("qemubench");
    let img = t.join("disk.qcow2");
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "32M"])
        .status()
        .expect("qemu-img (package qemu-utils) is needed");
    assert!(made.success());
    let path = format!("path={}", img.display());
    for rw in ["write", "read"] {
        let o = host(&[
            "bench",
            "--direct",
            "qcow2",
            "-c",
            &path,
            "--rw",
            rw,
            "--bs",
            "64k",
            "--qemu-img",
            "qcow2",
            "--json",
        ]);
        assert!(o.status.success(), "{rw}: {}", stderr(&o));
        let out = stdout(&o);
        let field = |k: &str| json_number(&out, k);
        // One pass over the 32 MiB disk, and qemu-img repeats exactly that many requests.
        assert_eq!(field("ops"), 512.0, "{out}");
        assert_eq!(field("qemu_img_ops"), 512.0, "{out}");
        assert!(field("qemu_img_mbps") > 0.0, "{out}");
    }
    // The write pass ran on a copy that is gone again; the image is still valid qcow2.
    let left: Vec<_> = std::fs::read_dir(&t.0).unwrap().collect();
    assert_eq!(left.len(), 1, "the qemu-img copy was not removed: {left:?}");
    let checked = std::process::Command::new("qemu-img")
        .args(["check", "-q", img.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(checked.success());
    assert_bad_input(
        &host(&[
            "bench",
            "--direct",
            "qcow2",
            "-c",
            &path,
            "--rw",
            "randread",
            "--qemu-img",
            "qcow2",
        ]),
        &["--qemu-img"],
    );
}

#[test]
fn bench_drives_the_full_ring_path() {
    let t = TempDir::new("ringbench");
    let img = t.join("disk.img");
    random_file(&img, 16 << 20, 9);
    for (plugin, args) in [
        ("discard", vec![]),
        (
            "mmap",
            vec!["-c".to_string(), format!("path={}", img.display())],
        ),
    ] {
        for bs in ["4k", "128k"] {
            let mut a = vec![
                "bench",
                plugin,
                "--rw",
                "randread",
                "--bs",
                bs,
                "--seconds",
                "0.3",
                "--json",
            ];
            a.extend(args.iter().map(String::as_str));
            let o = host(&a);
            assert!(o.status.success(), "{a:?}: {}", stderr(&o));
            let out = stdout(&o);
            assert!(
                out.contains("\"mode\":\"ring\"") && out.contains("\"memcpy_mbps\":"),
                "{out}"
            );
            let ops: f64 = out
                .split("\"ops\":")
                .nth(1)
                .unwrap()
                .split(',')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            assert!(ops > 10.0, "{out}");
        }
    }
}

#[test]
fn bench_measures_nbdkit_null_beside_the_plugin() {
    let o = host(&[
        "bench",
        "discard",
        "--rw",
        "randread",
        "--seconds",
        "0.5",
        "--nbdkit",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let field = |k: &str| json_number(&out, k);
    assert!(field("iops") > 0.0, "{out}");
    assert!(field("nbdkit_iops") > 0.0, "{out}");
    assert!(
        (field("nbdkit_mbps") - field("nbdkit_iops") * 4096.0 / 1e6).abs() < 1.0,
        "{out}"
    );
}

#[test]
fn bench_over_a_failing_disk_prints_its_figures_and_its_errors() {
    for mode in ["--direct", "--queues=1"] {
        let base = [
            "bench",
            mode,
            "error",
            "-c",
            "read_rate=0.5",
            "-c",
            "base=discard",
            "--seconds",
            "0.3",
        ];
        let o = host(&base);
        let (out, err) = (stdout(&o), stderr(&o));
        // The run went through but not cleanly: exit 1 (bad input is 2), one line on stderr.
        assert_eq!(o.status.code(), Some(1), "{mode}: {out}{err}");
        assert_eq!(err.lines().count(), 1, "{mode}: {err}");
        assert!(err.contains("requests failed (first: "), "{mode}: {err}");
        let figures = out
            .lines()
            .find(|l| l.trim_start().starts_with("plugin:"))
            .unwrap_or_else(|| panic!("{mode}: no figures: {out}"));
        assert!(figures.contains("IOPS") && figures.contains("p99"), "{out}");
        let errors = out
            .lines()
            .find(|l| l.trim_start().starts_with("errors:"))
            .unwrap_or_else(|| panic!("{mode}: no error count: {out}"));
        assert!(errors.contains("requests failed"), "{errors}");
        assert!(out.contains("memcpy:"), "{out}");

        let o = host(&[&base[..], &["--json"]].concat());
        let out = stdout(&o);
        assert_eq!(o.status.code(), Some(1), "{mode}: {out}{}", stderr(&o));
        let (ops, failed) = (json_number(&out, "ops"), json_number(&out, "failed"));
        // Half the reads fail: both counts are well away from zero.
        assert!(ops > 10.0 && failed > 10.0, "{mode}: {out}");
        assert!(json_number(&out, "iops") > 0.0, "{out}");
    }
    // A disk that does not fail says nothing about errors.
    let o = host(&["bench", "discard", "--seconds", "0.2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stdout(&o).contains("errors:"), "{}", stdout(&o));
}
