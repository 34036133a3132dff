//! Power loss, simulated from the image's own I/O log ([`Image::record_io`]): every `pwrite`
//! and `fdatasync` the plugin issues is recorded; a power loss keeps everything before some
//! sync and an arbitrary subset of the writes after it (the disk may reorder writes between
//! syncs). For every sync point we build such images — nothing after the sync, everything
//! up to the next sync, each single write alone, each single write missing, each prefix —
//! and require `qemu-img check` to find no corruption (leaks allowed), the plugin to read
//! the image without error, and every byte the guest flushed (and did not touch again) to
//! read back.
//!
//! Also: the order of writes and syncs of one flush, asserted directly; refcount-table
//! growth; out-of-range reads.

mod common;

use common::{check_clean, compare_to_raw, qemu_img_check, raw_of, run, tmpdir};
use qcow2::image::{Image, IoEvent, IoLog};
use std::path::Path;
use std::sync::{Arc, Mutex};
use xen_disk_plugin_api::ErrorKind;

/// Writes the file a power loss would leave: the image as it was when recording started
/// (`initial`, then a hole up to `initial_len`), the events before `from`, and of the
/// later ones only `sub`. Built with `pwrite` on a sparse file, so large holes cost nothing.
fn build_crash(
    path: &Path,
    initial: &[u8],
    initial_len: u64,
    events: &[IoEvent],
    from: usize,
    sub: &[usize],
) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.write_all_at(initial, 0).unwrap();
    f.set_len(initial_len).unwrap();
    for e in events[..from].iter().chain(sub.iter().map(|&i| &events[i])) {
        if let IoEvent::Write { offset, data } = e {
            f.write_all_at(data, *offset).unwrap();
        }
    }
}

/// Every crash the log allows, as (sync number, index after that sync, surviving later
/// writes): for each sync point, nothing after it, everything up to the next sync, each
/// single write alone, each single write missing, and each prefix.
fn crashes(events: &[IoEvent]) -> Vec<(usize, usize, Vec<usize>)> {
    let syncs: Vec<usize> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| **e == IoEvent::Sync)
        .map(|(i, _)| i)
        .collect();
    let mut starts = vec![None];
    starts.extend(syncs.iter().map(|&s| Some(s)));
    let mut out = Vec::new();
    for (k, start) in starts.iter().enumerate() {
        let from = start.map_or(0, |s| s + 1);
        let to = syncs.get(k).copied().unwrap_or(events.len());
        let epoch: Vec<usize> = (from..to).collect();
        let mut subsets: Vec<Vec<usize>> = vec![vec![], epoch.clone()];
        for (j, &i) in epoch.iter().enumerate() {
            subsets.push(vec![i]);
            subsets.push(epoch.iter().copied().filter(|&x| x != i).collect());
            subsets.push(epoch[..j].to_vec());
        }
        subsets.sort();
        subsets.dedup();
        out.extend(subsets.into_iter().map(|sub| (k, from, sub)));
    }
    out
}

fn assert_no_corruption(img: &Path, what: &str) {
    let (code, text) = qemu_img_check(img);
    assert!(
        matches!(code, 0 | 3) && !text.contains("ERROR"),
        "{what}: qemu-img check {code}: {text}"
    );
}

/// What the guest did: (log length when the op returned, touched byte range, is a flush).
struct Op {
    log_end: usize,
    range: Option<(usize, usize)>,
    flush: bool,
    model: Vec<u8>,
}

#[test]
fn power_loss_at_any_point_leaves_a_consistent_image() {
    const SIZE: usize = 8 << 20;
    let d = tmpdir("sim");
    let img = d.join("pl.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            img.to_str().unwrap(),
            &SIZE.to_string(),
        ],
    );
    // Some data already there: plain, and a compressed cluster the plugin will rewrite.
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 64k",
            "-c",
            "write -c -P 0x22 6M 4k",
            img.to_str().unwrap(),
        ],
    );
    let model = raw_of(&img);
    let image = Image::open(&img, false, &[]).unwrap();
    let initial = std::fs::read(&img).unwrap();
    let log: IoLog = Arc::new(Mutex::new(Vec::new()));
    image.record_io(log.clone());
    let mut ops = Vec::new();
    let len = |l: &IoLog| l.lock().unwrap().len();
    let do_write = |off: usize, n: usize, byte: u8, ops: &mut Vec<Op>| {
        let buf: Vec<u8> = (0..n).map(|i| byte ^ (i / 512) as u8).collect();
        image.write_at(off as u64, &buf).unwrap();
        let mut model = ops
            .last()
            .map_or_else(|| model.clone(), |o| o.model.clone());
        model[off..off + n].copy_from_slice(&buf);
        ops.push(Op {
            log_end: len(&log),
            range: Some((off, off + n)),
            flush: false,
            model: model.clone(),
        });
    };
    do_write(1 << 20, 1 << 20, 0x31, &mut ops); // fresh run, new L2 table
    do_write((3 << 20) + 512, 6000, 0x32, &mut ops); // partial head and tail
    do_write((6 << 20) + 1024, 1024, 0x33, &mut ops); // over the compressed cluster
    do_write(4096, 4096, 0x34, &mut ops); // in place
    image.flush().unwrap();
    ops.push(Op {
        log_end: len(&log),
        range: None,
        flush: true,
        model: ops.last().unwrap().model.clone(),
    });
    image.zero_range(32768, 16384, true).unwrap(); // frees clusters
    let mut m = ops.last().unwrap().model.clone();
    m[32768..32768 + 16384].fill(0);
    ops.push(Op {
        log_end: len(&log),
        range: Some((32768, 32768 + 16384)),
        flush: false,
        model: m,
    });
    do_write((5 << 20) - 8192, 64 << 10, 0x35, &mut ops); // spans two L2 tables
    do_write(1 << 20, 4096, 0x36, &mut ops); // in place again
    image.flush().unwrap();
    ops.push(Op {
        log_end: len(&log),
        range: None,
        flush: true,
        model: ops.last().unwrap().model.clone(),
    });
    do_write(7 << 20, 8192, 0x37, &mut ops); // never flushed by the guest: close does it
    drop(image);
    let events = log.lock().unwrap().clone();
    let final_model = ops.last().unwrap().model.clone();

    // No sync happens inside a write: writes are batched until the flush.
    for w in ops.windows(2) {
        if !w[1].flush {
            assert!(
                !events[w[0].log_end..w[1].log_end].contains(&IoEvent::Sync),
                "a write synced"
            );
        }
    }

    let syncs = events.iter().filter(|e| **e == IoEvent::Sync).count();
    assert!(syncs >= 4, "{syncs} syncs");
    let crash = d.join("crash.qcow2");
    let mut images = 0;
    for (k, from, sub) in crashes(&events) {
        build_crash(&crash, &initial, initial.len() as u64, &events, from, &sub);
        images += 1;
        let what = format!("crash after sync {k}, writes {sub:?}");
        assert_no_corruption(&crash, &what);
        let ro = Image::open(&crash, true, &[]).unwrap();
        let mut got = vec![0u8; SIZE];
        ro.read_at(0, &mut got).unwrap();
        // The newest flush whose last sync is in the crash image.
        if let Some(fi) = ops.iter().rposition(|o| o.flush && o.log_end <= from) {
            let want = &ops[fi].model;
            let mut touched = vec![false; SIZE];
            for o in &ops[fi + 1..] {
                if let Some((a, b)) = o.range {
                    touched[a..b].fill(true);
                }
            }
            for i in (0..SIZE).step_by(512) {
                if !touched[i] {
                    assert_eq!(
                        got[i..i + 512],
                        want[i..i + 512],
                        "{what}: flushed sector {} lost",
                        i / 512
                    );
                }
            }
        }
    }
    assert!(images > 20);
    // And the image as closed: clean, no leaks, exactly the guest's data.
    check_clean(&img);
    assert_eq!(raw_of(&img), final_model);
}

/// The first cluster of a file (images here may be gigabytes of hole).
fn head(p: &Path) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut b = vec![0u8; 4096];
    std::fs::File::open(p)
        .unwrap()
        .read_exact_at(&mut b, 0)
        .unwrap();
    b
}

fn header_u64(file: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(file[at..at + 8].try_into().unwrap())
}

#[test]
fn flush_orders_refcounts_then_sync_then_pointers() {
    let d = tmpdir("order");
    let img = d.join("o.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "64M"],
    );
    let file = std::fs::read(&img).unwrap();
    let l1 = header_u64(&file, 40);
    let rt = header_u64(&file, 48);
    let refblock0 = header_u64(&file, rt as usize);
    let image = Image::open(&img, false, &[]).unwrap();
    let log: IoLog = Arc::new(Mutex::new(Vec::new()));
    image.record_io(log.clone());
    let take = || std::mem::take(&mut *log.lock().unwrap());

    // 1 MiB into a fresh image (64 KiB clusters): one data write, nothing else yet.
    image.write_at(0, &vec![0xab; 1 << 20]).unwrap();
    let ev = take();
    assert_eq!(ev.len(), 1, "{:?}", ev.len());
    let IoEvent::Write {
        offset: data_at,
        data,
    } = &ev[0]
    else {
        panic!("{ev:?}")
    };
    assert_eq!(data.len(), 1 << 20, "one write for the whole run");
    let data_at = *data_at;

    // Flush: refcount block and the new L2 table, sync, the L1 entry, sync.
    image.flush().unwrap();
    let ev = take();
    let kinds: Vec<String> = ev
        .iter()
        .map(|e| match e {
            IoEvent::Sync => "sync".into(),
            IoEvent::Write { offset, .. } if *offset == refblock0 => "refblock".into(),
            IoEvent::Write { offset, data } if *offset >= l1 && *offset < l1 + 65536 => {
                assert_eq!(data.len(), 8);
                "l1".into()
            }
            IoEvent::Write { offset, data } if *offset < data_at && data.len() == 65536 => {
                "new-l2".into()
            }
            e => panic!("unexpected {e:?}"),
        })
        .collect();
    assert_eq!(kinds, ["refblock", "new-l2", "sync", "l1", "sync"]);

    // A second run in the same L2 table: refcounts, sync, the L2 table, sync.
    image.write_at(1 << 20, &vec![0xcd; 1 << 20]).unwrap();
    assert_eq!(take().len(), 1);
    image.flush().unwrap();
    let ev = take();
    assert_eq!(ev.len(), 4, "{:?}", ev.len());
    assert!(matches!(&ev[0], IoEvent::Write { offset, .. } if *offset == refblock0));
    assert_eq!(ev[1], IoEvent::Sync);
    assert!(
        matches!(&ev[2], IoEvent::Write { offset, data } if *offset < data_at && data.len() == 65536)
    );
    assert_eq!(ev[3], IoEvent::Sync);

    // In-place writes and a flush with no metadata: one sync, no metadata writes.
    image.write_at(4096, &[1u8; 4096]).unwrap();
    image.flush().unwrap();
    let ev = take();
    assert_eq!(ev.len(), 2);
    assert_eq!(ev[1], IoEvent::Sync);
    drop(image);
    let (code, text) = qemu_img_check(&img);
    assert_eq!(code, 0, "{text}");
}

#[test]
fn refcount_table_grows_past_its_coverage() {
    // 4 KiB clusters, 16-bit refcounts: a refcount block covers 2048 clusters (8 MiB) and
    // the one-cluster refcount table qemu-img makes covers 512 blocks = 4 GiB of file. A
    // sparse hole up to that point puts every new allocation past the table's coverage
    // without writing 4 GiB (unreferenced clusters with refcount 0 are legal).
    grow(16, 4 << 30);
}

#[test]
fn refcount_table_grows_with_64_bit_refcounts() {
    // 64-bit refcounts: a block covers 512 clusters (2 MiB), the table 1 GiB; the 20 MiB
    // written need ten new blocks after the move.
    grow(64, 1 << 30);
}

fn grow(refcount_bits: u32, coverage: u64) {
    let d = tmpdir(&format!("grow{refcount_bits}"));
    let img = d.join("g.qcow2");
    let size = 64usize << 20;
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("cluster_size=4096,refcount_bits={refcount_bits}"),
            img.to_str().unwrap(),
            &size.to_string(),
        ],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x41 0 1M",
            img.to_str().unwrap(),
        ],
    );
    let before = std::fs::read(&img).unwrap();
    assert_eq!(u32::from_be_bytes(before[56..60].try_into().unwrap()), 1);
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(coverage).unwrap();
    drop(f);

    let mut expect = vec![0u8; size];
    expect[..1 << 20].fill(0x41);
    let image = Image::open(&img, false, &[]).unwrap();
    // 20 MiB in 1 MiB pieces (needs 3+ refcount blocks past the old coverage), with a flush
    // in the middle so the table grows in one writeback and gets new blocks in a later one.
    for i in 0..20usize {
        let off = (2 << 20) + i * (2 << 20) % (size - (3 << 20));
        let buf: Vec<u8> = (0..1 << 20).map(|j| (i * 7 + j / 4096) as u8).collect();
        image.write_at(off as u64, &buf).unwrap();
        expect[off..off + (1 << 20)].copy_from_slice(&buf);
        if i == 9 {
            image.flush().unwrap();
        }
    }
    drop(image);
    let after = head(&img);
    let rt_clusters = u32::from_be_bytes(after[56..60].try_into().unwrap());
    assert!(rt_clusters > 1, "refcount table did not grow");
    assert_ne!(header_u64(&after, 48), header_u64(&before, 48));
    check_clean(&img);
    compare_to_raw(&img, &expect);
    // Reopened, the grown table is used, and it grows no further for more writes.
    let image = Image::open(&img, false, &[]).unwrap();
    assert_eq!(image.header().refcount_table_clusters, rt_clusters);
    image.write_at(60 << 20, &[9u8; 65536]).unwrap();
    drop(image);
    let (code, text) = qemu_img_check(&img);
    assert_eq!(code, 0, "{text}");
    assert_eq!(head(&img)[56..60], after[56..60]);
}

#[test]
fn power_loss_while_the_refcount_table_moves() {
    // 64-bit refcounts, 4 KiB clusters: the table covers 1 GiB; a hole to there makes the
    // first allocation move the table, and 3 MiB more need new refcount blocks.
    let d = tmpdir("growpl");
    let img = d.join("gp.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096,refcount_bits=64",
            img.to_str().unwrap(),
            "16M",
        ],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x41 0 64k",
            img.to_str().unwrap(),
        ],
    );
    let small = std::fs::read(&img).unwrap();
    let coverage = 1u64 << 30;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(coverage)
        .unwrap();
    let image = Image::open(&img, false, &[]).unwrap();
    let log: IoLog = Arc::new(Mutex::new(Vec::new()));
    image.record_io(log.clone());
    let mut want = vec![0u8; 16 << 20];
    want[..64 << 10].fill(0x41);
    for (i, off) in [1usize << 20, 5 << 20, 9 << 20].into_iter().enumerate() {
        image
            .write_at(off as u64, &vec![0x50 + i as u8; 1 << 20])
            .unwrap();
        want[off..off + (1 << 20)].fill(0x50 + i as u8);
    }
    image.flush().unwrap();
    let flushed_at = log.lock().unwrap().len();
    image.write_at(13 << 20, &vec![0x60; 1 << 20]).unwrap();
    image.zero_range(0, 64 << 10, true).unwrap();
    drop(image);
    let events = log.lock().unwrap().clone();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, IoEvent::Write { offset: 48, data } if data.len() == 12)),
        "the header never switched tables"
    );
    let crash = d.join("crash.qcow2");
    let all = crashes(&events);
    assert!(all.len() > 20);
    for (k, from, sub) in all {
        build_crash(&crash, &small, coverage, &events, from, &sub);
        let what = format!("crash after sync {k}, writes {sub:?}");
        assert_no_corruption(&crash, &what);
        let ro = Image::open(&crash, true, &[]).unwrap();
        let mut got = vec![0u8; 16 << 20];
        ro.read_at(0, &mut got).unwrap();
        if from >= flushed_at {
            // The flushed 3 MiB (nothing later touched them).
            assert!(got[1 << 20..10 << 20] == want[1 << 20..10 << 20], "{what}");
        }
    }
    let (code, text) = qemu_img_check(&img);
    assert_eq!(code, 0, "{text}");
}

#[test]
fn out_of_range_reads_and_writes_are_errors() {
    let d = tmpdir("range");
    let img = d.join("r.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "1M"],
    );
    let image = Image::open(&img, false, &[]).unwrap();
    let mut buf = vec![0u8; 4096];
    for off in [1u64 << 20, (1 << 20) - 512, u64::MAX - 100, u64::MAX] {
        let e = image.read_at(off, &mut buf).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::OutOfRange, "{e}");
        let e = image.write_at(off, &buf).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::OutOfRange, "{e}");
    }
    let e = image.zero_range(1 << 20, 4096, true).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutOfRange, "{e}");
    image.read_at((1 << 20) - 4096, &mut buf).unwrap();
}
