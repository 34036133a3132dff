//! Every size and offset the Rust blkif code uses, checked against Xen's own public headers
//! (`/usr/include/xen/io/blkif.h` and `ring.h`, package libxen-dev) by compiling C
//! `_Static_assert`s generated from our constants: with `-m64` for the native (x86_64/arm)
//! layout and `-m32` for the x86_32 one (gcc-multilib). The ring sizes for page orders 0..4
//! come from the header's own `__CONST_RING_SIZE`.

use std::process::Command;
use xen_disk_host::blkif::abi::*;

const HEADER: &str = "/usr/include/xen/io/blkif.h";

fn asserts(l: &Layout) -> String {
    let mut c =
        String::from("#include <stddef.h>\n#include <stdint.h>\n#include <xen/io/blkif.h>\n");
    let mut check = |expr: &str, value: usize| {
        c.push_str(&format!(
            "_Static_assert(({expr}) == {value}, \"{expr} should be {value}\");\n"
        ));
    };
    // Requests.
    check("sizeof(union blkif_sring_entry)", l.entry_size);
    check(
        "offsetof(struct blkif_request, operation)",
        common::OPERATION,
    );
    check("offsetof(struct blkif_request, nr_segments)", common::BYTE1);
    check("offsetof(struct blkif_request, handle)", common::WORD2);
    check("offsetof(struct blkif_request, id)", l.id);
    check(
        "offsetof(struct blkif_request, sector_number)",
        l.sector_number,
    );
    check("offsetof(struct blkif_request, seg)", l.segments);
    check("sizeof(struct blkif_request_segment)", SEGMENT_SIZE);
    check("offsetof(struct blkif_request_segment, gref)", 0);
    check("offsetof(struct blkif_request_segment, first_sect)", 4);
    check("offsetof(struct blkif_request_segment, last_sect)", 5);
    check(
        "sizeof(((struct blkif_request *)0)->seg) / sizeof(struct blkif_request_segment)",
        BLKIF_MAX_SEGMENTS_PER_REQUEST,
    );
    // Discard and indirect share the request's head.
    check(
        "offsetof(struct blkif_request_discard, flag)",
        common::BYTE1,
    );
    check("offsetof(struct blkif_request_discard, id)", l.id);
    check(
        "offsetof(struct blkif_request_discard, sector_number)",
        l.sector_number,
    );
    check(
        "offsetof(struct blkif_request_discard, nr_sectors)",
        l.discard_nr_sectors,
    );
    check(
        "offsetof(struct blkif_request_indirect, indirect_op)",
        common::BYTE1,
    );
    check(
        "offsetof(struct blkif_request_indirect, nr_segments)",
        common::WORD2,
    );
    check("offsetof(struct blkif_request_indirect, id)", l.id);
    check(
        "offsetof(struct blkif_request_indirect, sector_number)",
        l.sector_number,
    );
    check(
        "offsetof(struct blkif_request_indirect, handle)",
        l.indirect_handle,
    );
    check(
        "offsetof(struct blkif_request_indirect, indirect_grefs)",
        l.indirect_grefs,
    );
    check(
        "BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST",
        BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
    );
    // Responses.
    check("offsetof(struct blkif_response, id)", common::RSP_ID);
    check(
        "offsetof(struct blkif_response, operation)",
        common::RSP_OPERATION,
    );
    check(
        "offsetof(struct blkif_response, status)",
        common::RSP_STATUS,
    );
    check("sizeof(struct blkif_response)", l.response_size);
    // The shared ring header.
    check("offsetof(struct blkif_sring, req_prod)", header::REQ_PROD);
    check("offsetof(struct blkif_sring, req_event)", header::REQ_EVENT);
    check("offsetof(struct blkif_sring, rsp_prod)", header::RSP_PROD);
    check("offsetof(struct blkif_sring, rsp_event)", header::RSP_EVENT);
    check("offsetof(struct blkif_sring, ring)", RING_HEADER_SIZE);
    for order in 0..=MAX_RING_PAGE_ORDER {
        let pages = XEN_PAGE_SIZE << order;
        check(
            &format!("__CONST_RING_SIZE(blkif, {pages})"),
            ring_entries(order, l.entry_size) as usize,
        );
    }
    // Constants.
    for (name, value) in [
        ("BLKIF_OP_READ", BLKIF_OP_READ),
        ("BLKIF_OP_WRITE", BLKIF_OP_WRITE),
        ("BLKIF_OP_WRITE_BARRIER", BLKIF_OP_WRITE_BARRIER),
        ("BLKIF_OP_FLUSH_DISKCACHE", BLKIF_OP_FLUSH_DISKCACHE),
        ("BLKIF_OP_RESERVED_1", BLKIF_OP_RESERVED_1),
        ("BLKIF_OP_DISCARD", BLKIF_OP_DISCARD),
        ("BLKIF_OP_INDIRECT", BLKIF_OP_INDIRECT),
        ("BLKIF_DISCARD_SECURE", BLKIF_DISCARD_SECURE),
    ] {
        check(name, usize::from(value));
    }
    for (name, value) in [
        ("BLKIF_RSP_OKAY", BLKIF_RSP_OKAY),
        ("BLKIF_RSP_ERROR", BLKIF_RSP_ERROR),
        ("BLKIF_RSP_EOPNOTSUPP", BLKIF_RSP_EOPNOTSUPP),
    ] {
        c.push_str(&format!("_Static_assert({name} == {value}, \"{name}\");\n"));
    }
    for (name, value) in [
        ("VDISK_CDROM", VDISK_CDROM),
        ("VDISK_REMOVABLE", VDISK_REMOVABLE),
        ("VDISK_READONLY", VDISK_READONLY),
    ] {
        c.push_str(&format!("_Static_assert({name} == {value}, \"{name}\");\n"));
    }
    c
}

fn compile(source: &str, flags: &[&str], tag: &str) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!(
        "blkif-abi-{}-{}",
        std::process::id(),
        next_scratch()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{tag}.c"));
    std::fs::write(&file, source).unwrap();
    let out = Command::new("gcc")
        .args(flags)
        .args(["-fsyntax-only", "-std=gnu11"])
        .arg(&file)
        .output()
        .map_err(|e| format!("gcc: {e} (install gcc)"))?;
    let _ = std::fs::remove_dir_all(&dir);
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn native_layout_matches_blkif_h() {
    assert!(
        std::path::Path::new(HEADER).exists(),
        "{HEADER} missing: install libxen-dev"
    );
    compile(&asserts(Protocol::X86_64.layout()), &["-m64"], "native")
        .unwrap_or_else(|e| panic!("x86_64 layout differs from {HEADER}:\n{e}"));
}

#[test]
fn x86_32_layout_matches_blkif_h_compiled_for_32_bits() {
    assert!(
        std::path::Path::new(HEADER).exists(),
        "{HEADER} missing: install libxen-dev"
    );
    compile(&asserts(Protocol::X86_32.layout()), &["-m32"], "x86_32").unwrap_or_else(|e| {
        panic!("x86_32 layout differs from {HEADER} (needs gcc-multilib):\n{e}")
    });
}

#[test]
fn a_wrong_offset_would_be_caught() {
    // The check itself can fail: a deliberately wrong layout does not compile.
    let wrong = Layout {
        id: 4,
        ..*Protocol::X86_64.layout()
    };
    let e = compile(&asserts(&wrong), &["-m64"], "wrong").unwrap_err();
    assert!(e.contains("offsetof(struct blkif_request, id)"), "{e}");
}

/// A number no other compile of this process uses: tests run in parallel, each in its own folder.
fn next_scratch() -> usize {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}
