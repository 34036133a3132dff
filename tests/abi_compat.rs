//! The compatibility promise of plugin ABI 1.x, enforced: a plugin built against the frozen
//! 1.0 interface (the fossil) loads in this host, passes `check` and is served by `sim`; a
//! plugin built for 1.1 uses what 1.1 added (discard alignment, advertised to the guest);
//! one built for a newer minor loads as documented; another major is refused with one line.

mod common;
#[path = "support/build.rs"]
mod support;
use common::*;
use xen_disk_host::backend::features::{Advertisement, HostOffer};
use xen_disk_host::plugin::{open_stack, GuardedDisk};
use xen_disk_plugin_api::Config;

fn run_ok(args: &[&str]) -> String {
    let o = host(args);
    assert!(o.status.success(), "{args:?}: {}{}", stdout(&o), stderr(&o));
    stdout(&o)
}

#[test]
fn the_1_0_fossil_loads_passes_check_and_serves_sim_read_and_write() {
    let fossil = support::fossil();
    let so = fossil.to_str().unwrap();
    let out = run_ok(&["plugins", "inspect", so]);
    assert!(out.contains("abi version: 1.0\n"), "{out}");

    let t = TempDir::new("fossil");
    let img = t.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let path = format!("path={}", img.display());
    let out = run_ok(&["check", "--destructive", so, "-c", &path]);
    // Every case runs (the fossil declares flush, FUA, discard and write-zeroes) and passes.
    assert!(
        out.contains("check: 11 passed, 0 failed, 0 skipped"),
        "{out}"
    );

    let (input, output) = (t.join("in"), t.join("out"));
    random_file(&input, 32 << 20, 7);
    run_ok(&[
        "sim",
        "write",
        so,
        "-c",
        &path,
        "--in",
        input.to_str().unwrap(),
    ]);
    run_ok(&[
        "sim",
        "read",
        so,
        "-c",
        &path,
        "--out",
        output.to_str().unwrap(),
    ]);
    let want = std::fs::read(&input).unwrap();
    assert!(std::fs::read(&output).unwrap() == want, "sim read differs");
    assert!(std::fs::read(&img).unwrap() == want, "the image differs");
}

/// The Connect keys the guest would be given for `plugin` opened with `pairs`.
fn advertised(plugin: &str, pairs: &[String]) -> Vec<(&'static str, String)> {
    let stack = open_stack(plugin, &Config::from_pairs(pairs).unwrap()).unwrap();
    let disk = GuardedDisk::new(Box::new(stack.disk), false).unwrap();
    Advertisement::new(&HostOffer::standard(1, 1), &disk.info()).connect_keys()
}

fn key<'a>(keys: &'a [(&'static str, String)], k: &str) -> &'a str {
    keys.iter()
        .find(|(n, _)| *n == k)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {k} in {keys:?}"))
}

#[test]
fn a_1_1_plugin_declares_its_discard_alignment_and_the_guest_is_told() {
    let so = plugin_path("test-aligned-discard");
    let so = so.to_str().unwrap();
    let keys = advertised(so, &[]);
    assert_eq!(key(&keys, "feature-discard"), "1");
    assert_eq!(key(&keys, "discard-granularity"), "65536");
    assert_eq!(key(&keys, "discard-alignment"), "3584");
    // The plugin refuses discards off its granules: `check` passes only by honouring them.
    let out = run_ok(&["check", "--destructive", so]);
    assert!(
        out.contains("discarded on granules aligned at 3584")
            && out.contains("check: 10 passed, 0 failed"),
        "{out}"
    );
    // An alignment the plugin gets wrong (not below the granularity) is refused at open.
    let o = host(&["check", so, "-c", "alignment=64K"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(
        stderr(&o).contains("discard alignment 65536")
            || stdout(&o).contains("discard alignment 65536"),
        "{}{}",
        stdout(&o),
        stderr(&o)
    );
    // A 1.0 plugin knows nothing of alignment: the host asks, hears "unsupported", says 0.
    let fossil = support::fossil();
    let t = TempDir::new("fossil-align");
    let img = t.join("d.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let keys = advertised(
        fossil.to_str().unwrap(),
        &[format!("path={}", img.display())],
    );
    assert_eq!(key(&keys, "feature-discard"), "1");
    assert_eq!(key(&keys, "discard-alignment"), "0");
}

#[test]
fn a_plugin_for_a_newer_minor_loads_and_is_served_with_what_the_host_knows() {
    let so = plugin_path("test-newer-minor");
    let so = so.to_str().unwrap();
    let out = run_ok(&["plugins", "inspect", so]);
    let host_minor = format!(
        "abi version: 1.99 (newer than this host's 1.{}: what came after 1.{} is not used)",
        xen_disk_plugin_api::ABI_MINOR,
        xen_disk_plugin_api::ABI_MINOR
    );
    assert!(out.contains(&host_minor), "{out}");
    let out = run_ok(&["check", "--destructive", so]);
    assert!(out.contains(" 0 failed"), "{out}");
}

#[test]
fn a_plugin_for_another_major_is_refused_with_one_line_and_exit_2() {
    let p = plugin_path("test-wrong-abi");
    let host_version = format!("this host speaks ABI 1.{}", xen_disk_plugin_api::ABI_MINOR);
    let t = TempDir::new("major");
    let out = t.join("out");
    let sim = [
        "sim",
        "read",
        p.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    for args in [
        &["check", p.to_str().unwrap()][..],
        &["plugins", "inspect", p.to_str().unwrap()],
        &sim,
    ] {
        assert_bad_input(
            &host(args),
            &[
                "libtest_wrong_abi.so",
                "built for plugin ABI 2.0",
                &host_version,
            ],
        );
    }
}
