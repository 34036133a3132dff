//! The conformance cases, one function each, in the order they run. The cases that write
//! skip themselves without `--destructive` (see the module above for why).

use super::model::{Model, Rng};
use super::{Outcome, Subject};
use crate::plugin::GuardedDisk;
use std::sync::atomic::Ordering;
use xen_disk_plugin_api::{with_read_bufs, with_write_bufs, ErrorKind, ThreadModel};

/// A conformance case.
pub type Case = fn(&Subject<'_>) -> Outcome;

/// Every case, in run order.
pub const ALL: &[(&str, Case)] = &[
    ("reads", reads),
    ("pattern", pattern),
    ("first-last", first_last),
    ("host-bounds", host_bounds),
    ("flush", flush),
    ("write-zeroes", write_zeroes),
    ("discard", discard),
    ("read-only", read_only),
    ("concurrency", concurrency),
    ("plugin-edge", plugin_edge),
];

/// Splits `len` bytes into up to 8 buffers of multiples of 512, as guest segments come.
fn split(len: usize, rng: &mut Rng) -> Vec<usize> {
    let sectors = len / 512;
    let pieces = 1 + rng.below(8.min(sectors as u64)) as usize;
    let mut cuts: Vec<usize> = (0..pieces - 1)
        .map(|_| 1 + rng.below(sectors as u64 - 1) as usize)
        .collect();
    cuts.push(0);
    cuts.push(sectors);
    cuts.sort_unstable();
    cuts.dedup();
    cuts.windows(2).map(|w| (w[1] - w[0]) * 512).collect()
}

fn write_split(disk: &GuardedDisk, offset: u64, data: &[u8], rng: &mut Rng) -> Result<(), String> {
    let sizes = split(data.len(), rng);
    let mut parts = Vec::with_capacity(sizes.len());
    let mut at = 0;
    for n in sizes {
        parts.push(&data[at..at + n]);
        at += n;
    }
    with_write_bufs(&parts, |w| disk.write(offset, w, false))
        .map_err(|e| format!("write of {} bytes at {offset} failed: {e}", data.len()))
}

fn read_split(
    disk: &GuardedDisk,
    offset: u64,
    len: usize,
    rng: &mut Rng,
) -> Result<Vec<u8>, String> {
    // Pre-filled with a marker so a disk that leaves buffers untouched is caught.
    let mut data = vec![0xA5u8; len];
    let sizes = split(len, rng);
    let mut parts: Vec<&mut [u8]> = Vec::with_capacity(sizes.len());
    let mut rest = &mut data[..];
    for n in sizes {
        let (head, tail) = rest.split_at_mut(n);
        parts.push(head);
        rest = tail;
    }
    with_read_bufs(&mut parts, |r| disk.read(offset, r))
        .map_err(|e| format!("read of {len} bytes at {offset} failed: {e}"))?;
    Ok(data)
}

/// The reason a case that writes does not run, if it does not.
fn skip_if_no_writes(s: &Subject<'_>) -> Option<Outcome> {
    if s.plugin_read_only {
        return Some(Outcome::Skip("the disk is read-only".into()));
    }
    if !s.opts.destructive {
        return Some(Outcome::Skip(
            "writes over the disk's data: run with --destructive, on a scratch image".into(),
        ));
    }
    None
}

/// A random aligned region of up to `max_sectors` logical sectors.
fn region(s: &Subject<'_>, rng: &mut Rng, max_sectors: u64) -> (u64, usize) {
    let ls = u64::from(s.disk.info().logical_sector_size);
    let total = s.disk.size() / ls;
    let n = 1 + rng.below(max_sectors.min(total));
    let start = rng.below(total - n + 1);
    (start * ls, (n * ls) as usize)
}

/// Reads only: random regions read split across buffers, as guest segments come, then again
/// as one buffer, must agree; the first and last sectors are read too. It runs with or
/// without `--destructive`, so a default run checks the read path with the disk's own data.
fn reads(s: &Subject<'_>) -> Outcome {
    let ls = u64::from(s.disk.info().logical_sector_size);
    let mut rng = Rng::new(s.opts.seed ^ 4);
    let count = s.opts.ops.clamp(1, 50);
    let mut bytes = 0u64;
    let edges = [(0, ls as usize), (s.disk.size() - ls, ls as usize)];
    for i in 0..count + edges.len() {
        let (offset, len) = match edges.get(i) {
            Some(&e) => e,
            None => region(s, &mut rng, if i % 10 == 0 { 2048 } else { 64 }),
        };
        let split = match read_split(&s.disk, offset, len, &mut rng) {
            Ok(d) => d,
            Err(e) => return Outcome::Fail(e),
        };
        // The same marker as `read_split`'s: a disk that stores nothing (`discard`, or a
        // cow over it) may leave both untouched, and still agrees with itself.
        let mut whole = vec![0xA5u8; len];
        if let Err(e) = with_read_bufs(&mut [&mut whole[..]], |r| s.disk.read(offset, r)) {
            return Outcome::Fail(format!("read of {len} bytes at {offset} failed: {e}"));
        }
        if !s.opts.no_data {
            if let Some(at) = split.iter().zip(&whole).position(|(a, b)| a != b) {
                return Outcome::Fail(format!(
                    "byte {} reads differently split across buffers and as one buffer",
                    offset + at as u64
                ));
            }
        }
        bytes += len as u64;
    }
    Outcome::Pass(format!(
        "{} reads, {} KiB, split and whole agree{}",
        count + edges.len(),
        bytes / 1024,
        if s.opts.no_data {
            ", contents not compared (--no-data)"
        } else {
            ""
        }
    ))
}

/// Random writes split across buffers, each read back at once with another split, then
/// everything re-read at the end.
fn pattern(s: &Subject<'_>) -> Outcome {
    if let Some(o) = skip_if_no_writes(s) {
        return o;
    }
    let mut rng = Rng::new(s.opts.seed);
    let mut model = Model::default();
    let mut bytes = 0u64;
    let big = (1u64 << 20) / u64::from(s.disk.info().logical_sector_size);
    for i in 0..s.opts.ops {
        let max = if i % 25 == 0 { big } else { 64 };
        let (offset, len) = region(s, &mut rng, max);
        let mut data = vec![0u8; len];
        model.write(rng.next() | 1, offset, &mut data);
        if let Err(e) = write_split(&s.disk, offset, &data, &mut rng) {
            return Outcome::Fail(e);
        }
        bytes += len as u64;
        match read_split(&s.disk, offset, len, &mut rng) {
            Err(e) => return Outcome::Fail(e),
            Ok(got) if !s.opts.no_data => {
                if let Err(e) = model.verify(offset, &got) {
                    return Outcome::Fail(format!("read-back after write {i}: {e}"));
                }
            }
            Ok(_) => {}
        }
    }
    let runs = model.runs();
    for &(start, n) in &runs {
        for chunk in (0..n).step_by(2048) {
            let sectors = (n - chunk).min(2048);
            let offset = (start + chunk) * 512;
            // Runs are in 512-byte sectors; widen to the logical sector size.
            let ls = u64::from(s.disk.info().logical_sector_size);
            let lo = offset / ls * ls;
            let hi = (offset + sectors * 512).div_ceil(ls) * ls;
            match read_split(&s.disk, lo, (hi - lo) as usize, &mut rng) {
                Err(e) => return Outcome::Fail(e),
                Ok(got) if !s.opts.no_data => {
                    if let Err(e) = model.verify(lo, &got) {
                        return Outcome::Fail(format!("final re-read: {e}"));
                    }
                }
                Ok(_) => {}
            }
        }
    }
    let note = if s.opts.no_data {
        ", contents not compared (--no-data)"
    } else {
        ""
    };
    Outcome::Pass(format!(
        "{} writes, {} KiB, read back{note}",
        s.opts.ops,
        bytes / 1024
    ))
}

/// The first and the last logical sector hold what is written to them.
fn first_last(s: &Subject<'_>) -> Outcome {
    if let Some(o) = skip_if_no_writes(s) {
        return o;
    }
    let ls = u64::from(s.disk.info().logical_sector_size);
    let mut rng = Rng::new(s.opts.seed ^ 1);
    let mut model = Model::default();
    for offset in [0, s.disk.size() - ls] {
        let mut data = vec![0u8; ls as usize];
        model.write(rng.next() | 1, offset, &mut data);
        if let Err(e) = write_split(&s.disk, offset, &data, &mut rng) {
            return Outcome::Fail(e);
        }
        match read_split(&s.disk, offset, ls as usize, &mut rng) {
            Err(e) => return Outcome::Fail(e),
            Ok(got) if !s.opts.no_data => {
                if let Err(e) = model.verify(offset, &got) {
                    return Outcome::Fail(e);
                }
            }
            Ok(_) => {}
        }
    }
    Outcome::Pass(format!("sectors 0 and {}", s.disk.size() / ls - 1))
}

/// Out-of-range, overflowing and misaligned requests are refused by the host and never
/// reach the plugin.
fn host_bounds(s: &Subject<'_>) -> Outcome {
    let size = s.disk.size();
    let ls = u64::from(s.disk.info().logical_sector_size);
    let before = s.calls.load(Ordering::SeqCst);
    let cases = [
        ("at the end", size, ls),
        ("straddling the end", size - ls, 2 * ls),
        ("far beyond", u64::MAX - ls + 1, ls),
        ("misaligned", 256, ls),
        ("of a partial sector", 0, ls + 256),
    ];
    for (what, offset, len) in cases {
        let mut buf = vec![0u8; len as usize];
        let r = with_read_bufs(&mut [&mut buf], |b| s.disk.read(offset, b));
        match r {
            Err(e) if e.kind() == ErrorKind::OutOfRange => {}
            other => return Outcome::Fail(format!("read {what} ({offset}+{len}) gave {other:?}")),
        }
        if !s.disk.info().read_only {
            let r = with_write_bufs(&[&buf], |b| s.disk.write(offset, b, false));
            if !matches!(&r, Err(e) if e.kind() == ErrorKind::OutOfRange) {
                return Outcome::Fail(format!("write {what} ({offset}+{len}) gave {r:?}"));
            }
        }
    }
    let after = s.calls.load(Ordering::SeqCst);
    if after != before {
        return Outcome::Fail(format!(
            "{} refused request(s) reached the plugin",
            after - before
        ));
    }
    Outcome::Pass(format!(
        "{} bad reads{} refused before the plugin",
        cases.len(),
        if s.disk.info().read_only {
            ""
        } else {
            " and writes"
        }
    ))
}

fn flush(s: &Subject<'_>) -> Outcome {
    if !s.disk.can_flush() {
        return Outcome::Skip(
            "no volatile cache declared: the guest is told the disk is write-through".into(),
        );
    }
    match s.disk.flush() {
        Ok(()) => Outcome::Pass("flush succeeded".into()),
        Err(e) => Outcome::Fail(format!("flush failed: {e}")),
    }
}

/// Zeroes a range inside a written pattern: the range reads as zeroes, its edges keep data.
fn write_zeroes(s: &Subject<'_>) -> Outcome {
    if let Some(o) = skip_if_no_writes(s) {
        return o;
    }
    let ls = u64::from(s.disk.info().logical_sector_size);
    let mut rng = Rng::new(s.opts.seed ^ 2);
    let mut model = Model::default();
    let len = (16 * ls).min(s.disk.size());
    let offset = rng.below((s.disk.size() - len) / ls + 1) * ls;
    let mut data = vec![0u8; len as usize];
    model.write(rng.next() | 1, offset, &mut data);
    if let Err(e) = write_split(&s.disk, offset, &data, &mut rng) {
        return Outcome::Fail(e);
    }
    let (zoff, zlen) = if len >= 3 * ls {
        (offset + ls, len - 2 * ls)
    } else {
        (offset, len)
    };
    if let Err(e) = s.disk.write_zeroes(zoff, zlen) {
        return Outcome::Fail(format!("write-zeroes at {zoff}+{zlen} failed: {e}"));
    }
    model.zero(zoff, zlen);
    match read_split(&s.disk, offset, len as usize, &mut rng) {
        Err(e) => Outcome::Fail(e),
        Ok(got) if !s.opts.no_data => match model.verify(offset, &got) {
            Ok(()) => Outcome::Pass(format!(
                "{} KiB zeroed ({})",
                zlen / 1024,
                if s.disk.info().can_write_zeroes {
                    "native"
                } else {
                    "emulated by the host"
                }
            )),
            Err(e) => Outcome::Fail(e),
        },
        Ok(_) => Outcome::Pass("write-zeroes accepted (--no-data)".into()),
    }
}

/// A declared discard succeeds, leaves the neighbours intact, and the range stays readable.
fn discard(s: &Subject<'_>) -> Outcome {
    if let Some(o) = skip_if_no_writes(s) {
        return o;
    }
    if !s.disk.can_discard() {
        return Outcome::Skip("discard not declared (not advertised to guests)".into());
    }
    let info = s.disk.info();
    let ls = u64::from(info.logical_sector_size);
    let gran = u64::from(info.discard_granularity).max(u64::from(info.physical_sector_size));
    // The guest sends discards on granules that start `discard_alignment` bytes in (ABI
    // 1.1): so does this case, and a plugin may refuse others.
    let align = u64::from(info.discard_alignment);
    let len = (gran * 4)
        .max(64 * 1024)
        .min(s.disk.size() / ls * ls - align);
    let offset = align;
    let mut rng = Rng::new(s.opts.seed ^ 3);
    let mut model = Model::default();
    let mut data = vec![0u8; len as usize];
    model.write(rng.next() | 1, offset, &mut data);
    if let Err(e) = write_split(&s.disk, offset, &data, &mut rng) {
        return Outcome::Fail(e);
    }
    let (doff, dlen) = (offset + gran, len - 2 * gran);
    if let Err(e) = s.disk.discard(doff, dlen) {
        return Outcome::Fail(format!("discard at {doff}+{dlen} failed: {e}"));
    }
    model.forget(doff, dlen);
    match read_split(&s.disk, offset, len as usize, &mut rng) {
        Err(e) => Outcome::Fail(e),
        Ok(got) if !s.opts.no_data => match model.verify(offset, &got) {
            Ok(()) => {
                let zero = got[(doff - offset) as usize..(doff - offset + dlen) as usize]
                    .iter()
                    .all(|&b| b == 0);
                Outcome::Pass(format!(
                    "{} KiB discarded{}, neighbours intact, reads back {}",
                    dlen / 1024,
                    if align > 0 {
                        format!(" on granules aligned at {align}")
                    } else {
                        String::new()
                    },
                    if zero { "zeroes" } else { "old data" }
                ))
            }
            Err(e) => Outcome::Fail(format!("around the discarded range: {e}")),
        },
        Ok(_) => Outcome::Pass("discard accepted (--no-data)".into()),
    }
}

/// With the host's read-only switch, writes, zeroes and discards are refused before the plugin.
fn read_only(s: &Subject<'_>) -> Outcome {
    let ro = match GuardedDisk::new(Box::new(s.shared()), true) {
        Ok(d) => d,
        Err(e) => return Outcome::Fail(e.to_string()),
    };
    let before = s.calls.load(Ordering::SeqCst);
    let buf = vec![0u8; ro.info().logical_sector_size as usize];
    let w = with_write_bufs(&[&buf], |b| ro.write(0, b, false));
    let z = ro.write_zeroes(0, buf.len() as u64);
    for (what, r) in [("write", w), ("write-zeroes", z)] {
        if !matches!(&r, Err(e) if e.kind() == ErrorKind::ReadOnly) {
            return Outcome::Fail(format!("{what} on a read-only disk gave {r:?}"));
        }
    }
    if ro.can_discard() {
        return Outcome::Fail("discard is advertised on a read-only disk".into());
    }
    let after = s.calls.load(Ordering::SeqCst);
    if after != before {
        return Outcome::Fail("a refused write reached the plugin".into());
    }
    let mut rb = buf.clone();
    if let Err(e) = with_read_bufs(&mut [&mut rb], |b| ro.read(0, b)) {
        return Outcome::Fail(format!("read on a read-only disk failed: {e}"));
    }
    Outcome::Pass("writes refused, reads served".into())
}

/// Several threads each write and verify their own region at once.
fn concurrency(s: &Subject<'_>) -> Outcome {
    if let Some(o) = skip_if_no_writes(s) {
        return o;
    }
    let info = s.disk.info();
    let threads = s.opts.threads.max(1);
    let ls = u64::from(info.logical_sector_size);
    let slice = (s.disk.size() / threads as u64) / ls * ls;
    if slice < 64 * ls {
        return Outcome::Skip(format!("disk too small for {threads} threads"));
    }
    let failures: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || -> Result<(), String> {
                    let mut rng = Rng::new(s.opts.seed ^ (100 + t as u64));
                    let mut model = Model::default();
                    let base = t as u64 * slice;
                    for _ in 0..50 {
                        let n = 1 + rng.below(32);
                        let start = base + rng.below(slice / ls - n + 1) * ls;
                        let mut data = vec![0u8; (n * ls) as usize];
                        model.write(rng.next() | 1, start, &mut data);
                        write_split(&s.disk, start, &data, &mut rng)?;
                        let got = read_split(&s.disk, start, data.len(), &mut rng)?;
                        if !s.opts.no_data {
                            model
                                .verify(start, &got)
                                .map_err(|e| format!("thread {t}: {e}"))?;
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().unwrap_or(Err("thread panicked".into())).err())
            .collect()
    });
    match failures.first() {
        Some(e) => Outcome::Fail(e.clone()),
        None => Outcome::Pass(format!(
            "{threads} threads x 50 write+read ({})",
            if info.thread_model != ThreadModel::Serialized {
                "parallel"
            } else {
                "serialized by the host"
            }
        )),
    }
}

/// A call the host would never make, sent straight to the plugin: whatever the plugin does
/// (error, panic), it must come back as a value and the process must carry on.
fn plugin_edge(s: &Subject<'_>) -> Outcome {
    let mut buf = vec![0u8; 4096];
    let r = with_read_bufs(&mut [&mut buf], |b| s.raw.read(u64::MAX - 4095, b));
    let what = match r {
        Ok(()) => "accepted it (the host's guard is what protects this plugin)".to_string(),
        Err(e) if e.kind() == ErrorKind::Panic => {
            format!("panicked, and the panic came back as an error: {e}")
        }
        Err(e) => format!("returned an error: {e}"),
    };
    Outcome::Pass(format!("an unguarded read past the end: the plugin {what}"))
}
