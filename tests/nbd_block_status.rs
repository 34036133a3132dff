//! Block status (plugin ABI 1.2) through the NBD export: `nbdinfo --map` and `qemu-img map`
//! over `xen-disk-host nbd` show the same holes, zero ranges and data that `qemu-img map`
//! shows for the image file itself, for file, qcow2 (zero clusters, a sparse raw backing
//! file), vhd and cow over a base; a plugin built for ABI 1.0 reads as all data.

mod common;
mod nbd_common;
#[path = "support/build.rs"]
mod support;
use common::*;
use nbd_common::*;

fn same_map_as_qemu(tag: &str, plugin: &str, img: &std::path::Path, format: &str) {
    let t = TempDir::new(tag);
    let srv = NbdServer::start(
        &t.join("s.sock"),
        &[plugin, "-c", &format!("path={}", s(img))],
    );
    let want = qemu_map(s(img), Some(format));
    assert!(want.len() >= 3, "a map worth comparing: {want:?}");
    assert_eq!(qemu_map(&srv.uri(), None), want, "{plugin}: qemu-img map");
    // nbdinfo's flags: 1 hole, 2 zero; qemu's data is "not a hole".
    let from_nbdinfo: Vec<(u64, u64, bool, bool)> = nbdinfo_map(&srv.uri(), None)
        .into_iter()
        .map(|(start, len, f)| (start, len, f & 2 != 0, f & 1 == 0))
        .collect();
    assert_eq!(from_nbdinfo, want, "{plugin}: nbdinfo --map");
}

#[test]
fn qcow2_map_with_zero_clusters_equals_qemus() {
    let t = TempDir::new("bs-qcow2");
    let img = t.join("q.qcow2");
    tool_ok("qemu-img", &["create", "-f", "qcow2", s(&img), "64M"]);
    tool_ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 1 1M 3M",
            "-c",
            "write -z 8M 1M",
            "-c",
            "write -P 2 20M 64k",
            "-c",
            "write -z -u 20M 64k",
            "-c",
            "write -P 3 30M 192k",
            s(&img),
        ],
    );
    same_map_as_qemu("bs-qcow2-srv", "qcow2", &img, "qcow2");
}

#[test]
fn qcow2_over_a_sparse_raw_backing_file_shows_the_backing_files_holes() {
    let t = TempDir::new("bs-backing");
    let base = t.join("base.raw");
    sparse(&base, 32 * MIB as u64);
    tool_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 7 4M 1M", s(&base)],
    );
    let img = t.join("top.qcow2");
    tool_ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            s(&base),
            "-F",
            "raw",
            s(&img),
        ],
    );
    tool_ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 8 10M 1M", s(&img)],
    );
    same_map_as_qemu("bs-backing-srv", "qcow2", &img, "qcow2");
}

#[test]
fn dynamic_vhd_map_equals_qemus() {
    let t = TempDir::new("bs-vhd");
    let img = t.join("v.vhd");
    tool_ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "vpc",
            "-o",
            "subformat=dynamic",
            s(&img),
            "64M",
        ],
    );
    tool_ok(
        "qemu-io",
        &[
            "-f",
            "vpc",
            "-c",
            "write -P 1 1M 3M",
            "-c",
            "write -P 2 20M 64k",
            s(&img),
        ],
    );
    same_map_as_qemu("bs-vhd-srv", "vhd", &img, "vpc");
}

#[test]
fn a_sparse_file_map_equals_qemus() {
    let t = TempDir::new("bs-file");
    let img = t.join("f.img");
    sparse(&img, 48 * MIB as u64);
    tool_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 1 0 64k",
            "-c",
            "write -P 2 17M 3M",
            s(&img),
        ],
    );
    same_map_as_qemu("bs-file-srv", "file", &img, "raw");
}

#[test]
fn cow_shows_its_overlay_as_data_and_falls_through_to_the_base_elsewhere() {
    let t = TempDir::new("bs-cow");
    let base = t.join("base.img");
    sparse(&base, 16 * MIB as u64);
    tool_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 2M 1M", s(&base)],
    );
    let srv = NbdServer::start(
        &t.join("s.sock"),
        &[
            "cow",
            "-c",
            "granularity=64K",
            "-c",
            "base=file",
            "-c",
            &format!("base.path={}", s(&base)),
        ],
    );
    // Written through the overlay: one granule in a hole of the base, one in its data.
    tool_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 9 8M 4k",
            "-c",
            "write -P 9 2M 4k",
            &srv.uri(),
        ],
    );
    let m = MIB as u64;
    let want = vec![
        (0, 2 * m, true, false),
        (2 * m, m, false, true),
        (3 * m, 5 * m, true, false),
        (8 * m, 65536, false, true),
        (8 * m + 65536, 8 * m - 65536, true, false),
    ];
    assert_eq!(qemu_map(&srv.uri(), None), want);
    // The base itself is untouched: its own map still has the hole at 8M.
    assert_eq!(qemu_map(s(&base), Some("raw")).len(), 3);
}

#[test]
fn a_plugin_built_for_abi_1_0_is_served_and_reads_as_all_data() {
    let fossil = support::fossil();
    let t = TempDir::new("bs-fossil");
    let img = t.join("f.img");
    sparse(&img, 8 * MIB as u64);
    tool_ok("qemu-io", &["-f", "raw", "-c", "write -P 1 1M 1M", s(&img)]);
    let srv = NbdServer::start(
        &t.join("s.sock"),
        &[s(&fossil), "-c", &format!("path={}", s(&img))],
    );
    assert_eq!(nbdinfo_map(&srv.uri(), None), vec![(0, 8 * MIB as u64, 0)]);
    let out = tool_ok(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 1 1M 1M", &srv.uri()],
    );
    assert!(!out.contains("fail"), "{out}");
}
