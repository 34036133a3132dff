//! The file plugin on a real block device: a loop device over a generated image, with
//! 512- and 4096-byte logical sectors, buffered and `O_DIRECT`. Needs root and `losetup`
//! (util-linux); without them this test fails rather than skips.

use file::FilePlugin;
use std::path::{Path, PathBuf};
use std::process::Command;
use xen_disk_plugin_api::*;

/// A loop device over a file, detached on drop.
struct Loop(PathBuf);

impl Loop {
    fn attach(image: &Path, sector: u32) -> Loop {
        let out = Command::new("losetup")
            .args(["--find", "--show", "--direct-io=off", "--sector-size"])
            .arg(sector.to_string())
            .arg(image)
            .output()
            .expect("losetup (util-linux) is needed for this test");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

fn open(path: &Path, extra: &[&str]) -> Result<ForeignDisk> {
    let mut pairs = vec![format!("path={}", path.display())];
    pairs.extend(extra.iter().map(|s| s.to_string()));
    ForeignDisk::open(
        __root_module::<FilePlugin>(),
        &Config::from_pairs(&pairs).unwrap(),
    )
}

fn random(len: usize) -> Vec<u8> {
    std::iter::repeat_with(|| fastrand::u8(..))
        .take(len)
        .collect()
}

/// Writes from two 512-byte guest-style segments in the middle of pages, then reads back
/// into segments skewed the same way: a 4096-byte device must bounce both.
fn mid_page_round_trip(disk: &dyn Disk, offset: u64, sector: usize) -> Vec<u8> {
    let data = random(2 * sector);
    let mut page = vec![0u8; 4 * 4096];
    let start = (4096 - page.as_ptr() as usize % 4096) % 4096 + 512;
    let (a, rest) = page[start..].split_at_mut(sector);
    let b = &mut rest[4096 - sector..][..sector];
    a.copy_from_slice(&data[..sector]);
    b.copy_from_slice(&data[sector..]);
    with_write_bufs(&[a, b], |w| disk.write(offset, w)).unwrap();
    a.fill(0);
    b.fill(0);
    with_read_bufs(&mut [a, b], |r| disk.read(offset, r)).unwrap();
    assert_eq!([&*a, &*b].concat(), data, "mid-page round trip at {offset}");
    data
}

#[test]
fn loop_devices_with_512_and_4096_byte_sectors() {
    for sector in [512u32, 4096] {
        for direct in [false, true] {
            let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
            let image = dir.path().join("backing.img");
            let mut model = random(8 << 20);
            std::fs::write(&image, &model).unwrap();
            let dev = Loop::attach(&image, sector);
            let what = format!("{} sector {sector} direct {direct}", dev.0.display());
            let disk = open(&dev.0, &[&format!("direct={direct}")]).unwrap();
            let info = disk.info();
            assert_eq!(info.size, 8 << 20, "{what}");
            assert_eq!(info.logical_sector_size, sector, "{what}");
            let s = sector as usize;
            for offset in [0, 3 * s, (8 << 20) - 2 * s] {
                let data = mid_page_round_trip(&disk, offset as u64, s);
                model[offset..offset + 2 * s].copy_from_slice(&data);
            }
            disk.write_zeroes(5 * s as u64, 2 * s as u64).unwrap();
            model[5 * s..7 * s].fill(0);
            if info.can_discard {
                disk.discard(16 * s as u64, 4 * s as u64).unwrap();
                model[16 * s..20 * s].fill(0);
            }
            disk.flush().unwrap();
            let mut all = vec![0u8; 8 << 20];
            with_read_bufs(&mut [&mut all], |r| disk.read(0, r)).unwrap();
            assert!(all == model, "{what}: device differs from the model");
            drop(disk);
            drop(dev);
            assert!(
                std::fs::read(&image).unwrap() == model,
                "{what}: backing file differs"
            );
        }
    }
}
