//! Every shipped plugin end to end through the simulator — xenstore handshake, device, rings,
//! grants, queue threads, the plugin `.so` — across what a guest can negotiate: direct and
//! indirect requests, 1 and 2 queues, ring orders 0 and 4, persistent grants on and off,
//! 512- and 4096-byte sectors, read-only, flush, discard, online resize, and a guest reboot in
//! the middle of a workload. Random data written is read back and compared every time.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use xen_disk_host::blkif::abi::{BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_OKAY};
use xen_disk_host::plugin::{open_stack, GuardedDisk};
use xen_disk_host::simulation::{SimOptions, SimulatedDisk};
use xen_disk_plugin_api::Config;

const SIZE: u64 = 32 << 20;

/// The negotiations each plugin is run through.
fn matrix() -> Vec<(&'static str, SimOptions)> {
    let o = |order, queues, persistent, indirect, workers| SimOptions {
        ring_page_order: order,
        queues,
        persistent,
        indirect,
        workers,
        answer_on_completion: false,
        ..SimOptions::default()
    };
    vec![
        (
            "order 0, 1 queue, direct, per-request grants",
            o(0, 1, false, false, 2),
        ),
        (
            "order 4, 2 queues, indirect, persistent",
            o(4, 2, true, true, 2),
        ),
        (
            "order 0, 2 queues, indirect, per-request grants",
            o(0, 2, false, true, 1),
        ),
        (
            "order 4, 1 queue, direct, persistent, inline",
            o(4, 1, true, false, 0),
        ),
    ]
}

fn image(dir: &TempDir, plugin: &str) -> Config {
    let path = dir.join(&format!("disk.{plugin}"));
    let _ = std::fs::remove_file(&path);
    let p = path.display().to_string();
    let qemu = |fmt: &str| {
        let o = Command::new("qemu-img")
            .args(["create", "-q", "-f", fmt, &p, &SIZE.to_string()])
            .output()
            .expect("qemu-img (install qemu-utils)");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    match plugin {
        "qcow2" => qemu("qcow2"),
        "vhd" => qemu("vpc"),
        _ => std::fs::File::create(&path).unwrap().set_len(SIZE).unwrap(),
    }
    Config::from_pairs(&[format!("path={p}")]).unwrap()
}

fn open(plugin: &str, config: &Config, readonly: bool, sector: Option<u32>) -> Arc<GuardedDisk> {
    let so = plugin_path(plugin);
    let stack =
        open_stack(so.to_str().unwrap(), config).unwrap_or_else(|e| panic!("{plugin}: {e}"));
    let mut disk = GuardedDisk::new(Box::new(stack.disk), readonly).unwrap();
    if let Some(s) = sector {
        disk = disk.with_sector_size(s).unwrap();
    }
    Arc::new(disk)
}

/// Writes random data in pieces of several sizes, some unaligned to 4 KiB pages, reads it all
/// back and compares; returns what was written.
fn workload(sim: &mut SimulatedDisk, seed: u64, sector: usize) -> Vec<(u64, Vec<u8>)> {
    let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut written = Vec::new();
    for len in [
        sector,
        3 * sector.max(512) * 8,
        44 << 10,
        1 << 20,
        (3 << 20) + 4096,
    ] {
        let len = len / sector * sector;
        let max = (SIZE as usize - len) / sector;
        let offset = (next() as usize % max * sector) as u64;
        let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        sim.write(offset, &data)
            .unwrap_or_else(|e| panic!("write {len} at {offset}: {e}"));
        written.push((offset, data));
    }
    sim.flush().unwrap();
    verify(sim, &written);
    written
}

fn verify(sim: &mut SimulatedDisk, written: &[(u64, Vec<u8>)]) {
    // Later writes may overlap earlier ones: compare against the final bytes.
    let end = written
        .iter()
        .map(|(o, d)| *o as usize + d.len())
        .max()
        .unwrap_or(0);
    let mut model = vec![0u8; end];
    for (offset, data) in written {
        model[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
    }
    for (offset, data) in written {
        let at = *offset as usize;
        let mut back = vec![0u8; data.len()];
        sim.read(*offset, &mut back).unwrap();
        if back != model[at..at + data.len()] {
            let i = (0..back.len()).find(|&i| back[i] != model[at + i]).unwrap();
            panic!("byte {} of the disk differs", at + i);
        }
    }
}

#[test]
fn every_plugin_round_trips_data_in_every_negotiation() {
    let dir = TempDir::new("matrix");
    for plugin in ["mmap", "file", "qcow2", "vhd"] {
        for (what, opts) in matrix() {
            let config = image(&dir, plugin);
            let mut sim = SimulatedDisk::start_with(open(plugin, &config, false, None), &opts)
                .unwrap_or_else(|e| panic!("{plugin}, {what}: {e}"));
            let queues = sim.guest_disk().unwrap().queues();
            assert_eq!(queues, opts.queues as usize, "{plugin}, {what}");
            let d = sim.guest_disk().unwrap().description().clone();
            assert_eq!(d.persistent, opts.persistent, "{plugin}, {what}");
            let written = workload(&mut sim, 1, 512);
            sim.shutdown()
                .unwrap_or_else(|e| panic!("{plugin}, {what}: {e}"));
            // What reached the image survives a fresh attach with other settings.
            let mut again = SimulatedDisk::start(open(plugin, &config, true, None)).unwrap();
            verify(&mut again, &written);
            again.shutdown().unwrap();
        }
    }
}

#[test]
fn the_discard_plugin_serves_every_negotiation() {
    let config = Config::from_pairs(&["size=64M".to_string()]).unwrap();
    for (what, opts) in matrix() {
        let mut sim = SimulatedDisk::start_with(open("discard", &config, false, None), &opts)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let data = vec![0x5a; 1 << 20];
        sim.write(4096, &data)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let mut back = vec![0u8; 1 << 20];
        sim.read(4096, &mut back)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        sim.flush().unwrap();
        let g = sim.guest_disk().unwrap();
        assert_eq!(g.discard(0, 1 << 20).unwrap(), BLKIF_RSP_OKAY, "{what}");
        sim.shutdown().unwrap();
    }
}

#[test]
fn sectors_of_4096_bytes_round_trip_and_refuse_misaligned_io() {
    let dir = TempDir::new("4k");
    for plugin in ["mmap", "file", "qcow2", "vhd"] {
        let config = image(&dir, plugin);
        let mut sim = SimulatedDisk::start(open(plugin, &config, false, Some(4096))).unwrap();
        let d = sim.guest_disk().unwrap().description().clone();
        assert_eq!(d.sector_size, 4096, "{plugin}");
        assert!(
            d.sectors >= SIZE / 512 && d.sectors.is_multiple_of(8),
            "{plugin}: {d:?}"
        );
        workload(&mut sim, 2, 4096);
        let e = sim.write(512, &[1u8; 4096]).unwrap_err();
        assert!(e.contains("answered BLKIF_RSP_ERROR (-1"), "{plugin}: {e}");
        let mut b = vec![0u8; 512];
        assert!(sim.read(4096, &mut b).is_err(), "{plugin}: a 512-byte read");
        sim.shutdown().unwrap();
    }
}

#[test]
fn read_only_disks_read_and_refuse_writes() {
    let dir = TempDir::new("ro");
    for plugin in ["mmap", "file", "qcow2", "vhd"] {
        let config = image(&dir, plugin);
        // Put data there first, read-write.
        let mut sim = SimulatedDisk::start(open(plugin, &config, false, None)).unwrap();
        let data: Vec<u8> = (0..65536u32).map(|i| (i * 7) as u8).collect();
        sim.write(1 << 20, &data).unwrap();
        sim.flush().unwrap();
        sim.shutdown().unwrap();
        let mut sim = SimulatedDisk::start(open(plugin, &config, true, None)).unwrap();
        let d = sim.guest_disk().unwrap().description().clone();
        assert_ne!(
            d.info & xen_disk_host::blkif::abi::VDISK_READONLY,
            0,
            "{plugin}"
        );
        let mut back = vec![0u8; data.len()];
        sim.read(1 << 20, &mut back).unwrap();
        assert_eq!(back, data, "{plugin}");
        let e = sim.write(0, &[9u8; 4096]).unwrap_err();
        assert!(e.contains("answered BLKIF_RSP_ERROR (-1"), "{plugin}: {e}");
        let g = sim.guest_disk().unwrap();
        assert_eq!(
            g.discard(0, 4096).unwrap(),
            BLKIF_RSP_EOPNOTSUPP,
            "{plugin}: discard on a read-only disk"
        );
        sim.shutdown().unwrap();
    }
}

#[test]
fn discard_through_the_file_plugin_reads_back_zeroes() {
    let dir = TempDir::new("discard");
    let config = image(&dir, "file");
    let mut sim = SimulatedDisk::start(open("file", &config, false, None)).unwrap();
    sim.write(0, &vec![0xAB; 1 << 20]).unwrap();
    let g = sim.guest_disk().unwrap();
    assert!(
        g.description().discard,
        "the file plugin offers discard on a file"
    );
    assert_eq!(g.discard(64 << 10, 256 << 10).unwrap(), BLKIF_RSP_OKAY);
    let mut back = vec![0u8; 1 << 20];
    sim.read(0, &mut back).unwrap();
    assert!(back[..64 << 10].iter().all(|&b| b == 0xAB));
    assert!(back[64 << 10..320 << 10].iter().all(|&b| b == 0));
    assert!(back[320 << 10..].iter().all(|&b| b == 0xAB));
    sim.shutdown().unwrap();
}

#[test]
fn growing_the_image_resizes_the_connected_disk() {
    let dir = TempDir::new("resize");
    let config = image(&dir, "file");
    let path = dir.join("disk.file");
    let mut sim = SimulatedDisk::start(open("file", &config, false, None)).unwrap();
    assert_eq!(sim.size(), SIZE);
    assert!(sim.write(SIZE, &[1u8; 4096]).is_err(), "past the end");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(2 * SIZE)
        .unwrap();
    // The device polls the plugin's size; the guest sees `sectors` change.
    // Broken, it never grows: a generous deadline for a loaded machine.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while sim.backend_sectors() != Some(2 * SIZE / 512) {
        assert!(std::time::Instant::now() < deadline, "sectors never grew");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    sim.refresh_size();
    assert_eq!(sim.size(), 2 * SIZE);
    let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    sim.write(SIZE + (4 << 20), &data).unwrap();
    let mut back = vec![0u8; data.len()];
    sim.read(SIZE + (4 << 20), &mut back).unwrap();
    assert_eq!(back, data);
    sim.shutdown().unwrap();
    assert_eq!(std::fs::metadata(Path::new(&path)).unwrap().len(), 2 * SIZE);
}

#[test]
fn a_guest_reboot_mid_workload_loses_nothing() {
    let dir = TempDir::new("reboot");
    for plugin in ["file", "qcow2"] {
        let config = image(&dir, plugin);
        let mut sim = SimulatedDisk::start(open(plugin, &config, false, None)).unwrap();
        let mut written = workload(&mut sim, 3, 512);
        // Writes in flight-sized pieces, then the guest goes away without a flush (a reboot
        // flushes nothing more than what was answered), and comes back with other wishes.
        let extra: Vec<u8> = (0..(2 << 20)).map(|i: u32| (i * 31 % 255) as u8).collect();
        sim.write(8 << 20, &extra).unwrap();
        written.push((8 << 20, extra));
        let after = SimOptions {
            ring_page_order: 0,
            queues: 2,
            persistent: false,
            indirect: false,
            workers: 1,
            answer_on_completion: false,
            // Rings that park between the guest's requests after the reboot.
            park_after: Some(std::time::Duration::from_millis(20)),
            latency_every: 2,
        };
        sim.reboot(&after).unwrap();
        assert_eq!(sim.guest_disk().unwrap().queues(), 2);
        verify(&mut sim, &written);
        written.extend(workload(&mut sim, 4, 512));
        verify(&mut sim, &written);
        sim.shutdown().unwrap();
    }
}

/// An asynchronous plugin (a test fixture completing requests late, on its own threads and
/// out of order): submitted from the ring thread, answered through the completion channel
/// or, with `answer_on_completion`, by the fixture's threads themselves, in every
/// negotiation (order 0 fills the ring, so requests wait for slots those threads free);
/// a swap to it and away from it under the same guest drains what it holds.
#[test]
fn an_async_plugin_round_trips_data_in_every_negotiation() {
    let config = Config::from_pairs(&["size=32M".to_string()]).unwrap();
    for answer_on_completion in [false, true] {
        for (what, opts) in matrix() {
            let what = format!("{what}, answer_on_completion {answer_on_completion}");
            let opts = SimOptions {
                answer_on_completion,
                ..opts
            };
            let disk = open("test-async-ram", &config, false, None);
            assert!(disk.is_async(), "the fixture declares ThreadModel::Async");
            let mut sim =
                SimulatedDisk::start_with(disk, &opts).unwrap_or_else(|e| panic!("{what}: {e}"));
            workload(&mut sim, 3, 512);
            sim.shutdown().unwrap_or_else(|e| panic!("{what}: {e}"));
        }
    }
}
