//! Swapping the plugin behind a connected disk while a simulated guest runs a verified
//! workload: the guest sees no error and no lost or corrupted write, and a swap that cannot
//! happen leaves the old plugin serving.

mod common;
use common::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use xen_disk_host::plugin::{open_stack, GuardedDisk};
use xen_disk_host::simulation::SimulatedDisk;
use xen_disk_plugin_api::Config;

const SIZE: u64 = 16 << 20;

fn open(plugin: &str, pairs: &[String]) -> Box<dyn xen_disk_plugin_api::Disk> {
    let so = plugin_path(plugin);
    let stack = open_stack(so.to_str().unwrap(), &Config::from_pairs(pairs).unwrap())
        .unwrap_or_else(|e| panic!("{plugin}: {e}"));
    Box::new(stack.disk)
}

#[test]
fn twenty_swaps_between_file_and_mmap_under_a_verified_workload() {
    let t = TempDir::new("swap");
    let img = t.join("disk.img");
    random_file(&img, SIZE as usize, 5);
    let path = vec![format!("path={}", img.display())];
    let mut model = std::fs::read(&img).unwrap();
    let disk = Arc::new(GuardedDisk::new(open("file", &path), false).unwrap());
    let mut sim = SimulatedDisk::start(disk.clone()).unwrap();

    let done = Arc::new(AtomicBool::new(false));
    let (d, flag, p) = (disk.clone(), done.clone(), path.clone());
    let swapper = std::thread::spawn(move || {
        let mut pauses = Vec::new();
        for i in 0..20 {
            let plugin = if i % 2 == 0 { "mmap" } else { "file" };
            let s = d.swap(open(plugin, &p), false).unwrap();
            pauses.push(s.pause);
            std::thread::sleep(Duration::from_millis(15));
        }
        flag.store(true, Ordering::SeqCst);
        pauses
    });

    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let (mut reads, mut writes) = (0, 0);
    while !done.load(Ordering::SeqCst) || reads + writes < 200 {
        let sectors = 1 + next() % 512;
        let len = (sectors * 512) as usize;
        let at = (next() % (SIZE / 512 - sectors)) * 512;
        let range = at as usize..at as usize + len;
        if next() % 2 == 0 {
            let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            sim.write(at, &data)
                .unwrap_or_else(|e| panic!("write {len} at {at}: {e}"));
            model[range].copy_from_slice(&data);
            writes += 1;
        } else {
            let mut back = vec![0u8; len];
            sim.read(at, &mut back)
                .unwrap_or_else(|e| panic!("read {len} at {at}: {e}"));
            assert!(
                back == model[range],
                "read {len} at {at} differs from the model"
            );
            reads += 1;
        }
    }
    let mut pauses = swapper.join().unwrap();
    // Everything the guest wrote is in the image, whichever plugin wrote it.
    sim.flush().unwrap();
    let mut all = vec![0u8; SIZE as usize];
    sim.read(0, &mut all).unwrap();
    assert!(
        all == model,
        "the disk differs from the model after 20 swaps"
    );
    sim.shutdown().unwrap();
    assert!(
        std::fs::read(&img).unwrap() == model,
        "the image differs from the model"
    );
    pauses.sort();
    eprintln!(
        "20 swaps under {reads} reads and {writes} writes: pause median {:?}, max {:?}",
        pauses[10], pauses[19]
    );
}

#[test]
fn a_swap_that_cannot_happen_leaves_the_old_plugin_serving() {
    let t = TempDir::new("swap-bad");
    let img = t.join("disk.img");
    random_file(&img, SIZE as usize, 6);
    let small = t.join("small.img");
    random_file(&small, (SIZE / 2) as usize, 7);
    let disk = Arc::new(
        GuardedDisk::new(open("file", &[format!("path={}", img.display())]), false).unwrap(),
    );
    let mut sim = SimulatedDisk::start(disk.clone()).unwrap();
    let smaller = open("file", &[format!("path={}", small.display())]);
    let e = disk.swap(smaller, false).unwrap_err().to_string();
    assert!(e.contains("smaller"), "{e}");
    let read_only = open(
        "file",
        &[format!("path={}", img.display()), "readonly=true".into()],
    );
    let e = disk.swap(read_only, false).unwrap_err().to_string();
    assert!(e.contains("read-only"), "{e}");
    let data = vec![0x42u8; 65536];
    sim.write(4096, &data).unwrap();
    let mut back = vec![0u8; data.len()];
    sim.read(4096, &mut back).unwrap();
    assert_eq!(back, data);
    sim.shutdown().unwrap();
    assert_eq!(&std::fs::read(&img).unwrap()[4096..4096 + 65536], &data[..]);
}
