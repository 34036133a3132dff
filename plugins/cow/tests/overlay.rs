//! The filter in-process over a RAM base: copy-up, merging, persistence and its ordering.

use cow::CowFilter;
use std::sync::{Arc, Mutex};
use xen_disk_plugin_api::*;

/// A base that counts writes, so tests can see cow never makes one.
struct Ram {
    data: Mutex<Vec<u8>>,
    writes: Arc<Mutex<u32>>,
}

impl Disk for Ram {
    fn info(&self) -> DiskInfo {
        DiskInfo::new(self.data.lock().unwrap().len() as u64)
    }
    fn read(&self, offset: u64, bufs: &mut ReadBufs<'_>) -> Result<()> {
        bufs.copy_from(&self.data.lock().unwrap()[offset as usize..][..bufs.len()]);
        Ok(())
    }
    fn write(&self, _: u64, _: &WriteBufs<'_>) -> Result<()> {
        *self.writes.lock().unwrap() += 1;
        Err(Error::msg("base written"))
    }
}

const SIZE: usize = 1 << 20;

fn pattern() -> Vec<u8> {
    (0..SIZE).map(|i| (i * 7 % 251) as u8).collect()
}

fn open(pairs: &[String]) -> (ForeignDisk, Arc<Mutex<u32>>) {
    let writes = Arc::new(Mutex::new(0));
    let base = ForeignDisk::new(export_disk(Ram {
        data: Mutex::new(pattern()),
        writes: writes.clone(),
    }));
    let m = __filter_root_module::<CowFilter>();
    let disk = ForeignDisk::open_over(m, &Config::from_pairs(pairs).unwrap(), base).unwrap();
    (disk, writes)
}

fn read(d: &ForeignDisk, offset: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    // Two buffers, so merged reads cross a buffer edge too.
    let (a, b) = out.split_at_mut(len / 2);
    with_read_bufs(&mut [a, b], |bufs| d.read(offset, bufs)).unwrap();
    out
}

fn write(d: &ForeignDisk, offset: u64, data: &[u8]) {
    with_write_bufs(&[data], |b| d.write(offset, b)).unwrap();
}

#[test]
fn partial_writes_copy_up_and_reads_merge() {
    let (d, writes) = open(&["granularity=4K".into()]);
    let mut expect = pattern();
    // Inside one granule, across two, and a whole one.
    for (at, len, byte) in [
        (512, 512, 1u8),
        (4096 * 3 - 512, 1024, 2),
        (8192 * 4, 4096, 3),
    ] {
        write(&d, at as u64, &vec![byte; len]);
        expect[at..at + len].fill(byte);
    }
    d.write_zeroes(20480 + 512, 1024).unwrap();
    expect[20480 + 512..20480 + 1536].fill(0);
    assert_eq!(read(&d, 0, SIZE), expect);
    assert_eq!(
        read(&d, 4096 * 3 - 1024, 8192),
        expect[4096 * 3 - 1024..][..8192]
    );
    assert_eq!(*writes.lock().unwrap(), 0, "cow wrote its base");
}

#[test]
fn concurrent_partial_writes_to_one_granule_all_land() {
    let (d, _) = open(&[]);
    let d = Arc::new(d);
    // 64 KiB granule 2 gets 128 sector writes from 8 threads at once, all copy-ups racing.
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let d = d.clone();
            std::thread::spawn(move || {
                for s in (t..128).step_by(8) {
                    write(&d, (2 << 16) + s * 512, &[s as u8 + 1; 512]);
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    let got = read(&d, 2 << 16, 1 << 16);
    for s in 0..128 {
        assert!(
            got[s * 512..][..512].iter().all(|&b| b == s as u8 + 1),
            "sector {s}"
        );
    }
}

#[test]
fn file_overlay_keeps_flushed_writes_across_a_crash_and_all_writes_across_a_close() {
    let dir = std::env::temp_dir().join(format!("cow-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("o.cow");
    let _ = std::fs::remove_file(&path);
    let key = format!("overlay={}", path.display());
    {
        let (d, _) = open(std::slice::from_ref(&key));
        assert!(d.info().can_flush);
        write(&d, 4096, &[9; 4096]);
        d.flush().unwrap();
        write(&d, 1 << 18, &[8; 512]);
        // A crash: no close, so the unflushed write's bit never reaches the file.
        std::mem::forget(d);
    }
    let mut expect = pattern();
    expect[4096..8192].fill(9);
    let (d, _) = open(std::slice::from_ref(&key));
    assert_eq!(
        read(&d, 0, SIZE),
        expect,
        "after a crash: flushed kept, unflushed gone"
    );
    write(&d, 1 << 18, &[8; 512]);
    // A clean close persists the bitmap without a flush from the guest.
    drop(d);
    let (d, _) = open(std::slice::from_ref(&key));
    expect[1 << 18..(1 << 18) + 512].fill(8);
    assert_eq!(read(&d, 0, SIZE), expect, "after a close");
    drop(d);
    // A granularity other than the file's is refused, naming the key and the file.
    let e = ForeignDisk::open_over(
        __filter_root_module::<CowFilter>(),
        &Config::from_pairs(&[key, "granularity=4K".into()]).unwrap(),
        ForeignDisk::new(export_disk(Ram {
            data: Mutex::new(pattern()),
            writes: Arc::default(),
        })),
    )
    .err()
    .unwrap();
    assert!(
        e.message().contains("granularity") && e.message().contains("o.cow"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn memory_overlay_starts_empty_each_time() {
    let (d, _) = open(&[]);
    assert!(!d.info().can_flush);
    write(&d, 0, &[5; 512]);
    drop(d);
    let (d, _) = open(&[]);
    assert_eq!(read(&d, 0, 512), pattern()[..512]);
}

#[test]
fn bad_granularity_is_a_config_error() {
    for g in ["3000", "256", "2G"] {
        let e = ForeignDisk::open_over(
            __filter_root_module::<CowFilter>(),
            &Config::from_pairs(&[format!("granularity={g}")]).unwrap(),
            ForeignDisk::new(export_disk(Ram {
                data: Mutex::new(pattern()),
                writes: Arc::default(),
            })),
        )
        .err()
        .unwrap();
        assert_eq!(e.kind(), ErrorKind::Config, "{g}: {e}");
        assert!(e.message().contains("granularity"), "{e}");
    }
}

/// The filter over a RAM base holding `data`.
fn open_over_data(data: Vec<u8>, pairs: &[String]) -> Result<ForeignDisk> {
    ForeignDisk::open_over(
        __filter_root_module::<CowFilter>(),
        &Config::from_pairs(pairs).unwrap(),
        ForeignDisk::new(export_disk(Ram {
            data: Mutex::new(data),
            writes: Arc::default(),
        })),
    )
}

#[test]
fn a_commit_stopped_midway_leaves_an_overlay_that_opens_over_the_half_written_base() {
    use cow::overlay::{BaseRecord, BaseView, Fingerprint, Overlay};
    let dir = std::env::temp_dir().join(format!("cow-commit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("o.cow");
    let key = vec![format!("overlay={}", path.display())];
    {
        // One granule in the first MiB's sample, and (1 MiB base) in the last's.
        let d = open_over_data(pattern(), &key).unwrap();
        write(&d, 0, &[1; 65536]);
        write(&d, 512 << 10, &[2; 4096]);
    }
    let shown = read(&open_over_data(pattern(), &key).unwrap(), 0, SIZE);
    // What `cow commit` does, stopped after its first granule reached the base.
    let base = Mutex::new(pattern());
    let read_base = |at: u64, buf: &mut [u8]| {
        buf.copy_from_slice(&base.lock().unwrap()[at as usize..][..buf.len()]);
        Ok(())
    };
    let view = BaseView {
        size: SIZE as u64,
        sector: 512,
        read: &read_base,
    };
    let mut o = Overlay::open_file(&path).unwrap();
    assert_eq!(o.base_mismatch(&view).unwrap(), None);
    let after = Fingerprint::of(SIZE as u64, 512, |at, buf| o.read_merged(at, buf, &view)).unwrap();
    o.set_base_record(BaseRecord {
        fingerprint: after,
        committing: true,
    })
    .unwrap();
    let mut granule = vec![0u8; 65536];
    o.read_at(0, &mut granule).unwrap();
    base.lock().unwrap()[..65536].copy_from_slice(&granule);
    drop(o);
    // The half-written base opens and the disk shows what it showed; so does the base
    // before the commit began; another base of the same size is still refused.
    let half = base.into_inner().unwrap();
    assert_ne!(half, pattern());
    assert_eq!(read(&open_over_data(half, &key).unwrap(), 0, SIZE), shown);
    assert_eq!(
        read(&open_over_data(pattern(), &key).unwrap(), 0, SIZE),
        shown
    );
    let e = open_over_data(vec![7; SIZE], &key).err().unwrap();
    assert!(
        e.message().contains("o.cow") && e.message().contains("another base"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
