//! Sequential depth-1 benchmark with the same pattern as `qemu-img bench -f vpc`: `count`
//! requests of `size` bytes starting at 0, each at the previous offset + size, wrapping to 0
//! at the end of the disk. Prints MB/s.
//!
//! ```text
//! cargo run --release -p xen-disk-plugin-vhd --example vhd_bench -- IMAGE COUNT SIZE [read|write]
//! qemu-img bench -f vpc -t writeback -d 1 -c COUNT -s SIZE [-w] IMAGE      # the reference
//! ```

use std::time::Instant;
use vhd::VhdPlugin;
use xen_disk_plugin_api::*;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: bench IMAGE COUNT SIZE [read|write]");
        std::process::exit(2);
    }
    let count: u64 = args[2].parse().expect("COUNT");
    let size = parse_size(&args[3]).expect("SIZE") as usize;
    let write = args.get(4).map(String::as_str) == Some("write");
    let config = Config::from_pairs(&[format!("path={}", args[1])]).expect("config");
    let disk = ForeignDisk::open(__root_module::<VhdPlugin>(), &config).unwrap_or_else(|e| {
        eprintln!("bench: {e}");
        std::process::exit(1)
    });
    let disk_size = disk.info().size;
    let mut buf = vec![0xa5u8; size];
    let mut off = 0u64;
    let start = Instant::now();
    for _ in 0..count {
        if off + size as u64 > disk_size {
            off = 0;
        }
        let r = if write {
            with_write_bufs(&[&buf], |b| disk.write(off, b))
        } else {
            with_read_bufs(&mut [&mut buf], |b| disk.read(off, b))
        };
        r.unwrap_or_else(|e| panic!("at {off}: {e}"));
        off += size as u64;
    }
    if write {
        disk.flush().expect("flush");
    }
    let secs = start.elapsed().as_secs_f64();
    let mb = (count * size as u64) as f64 / 1e6;
    println!(
        "{} {count} x {size} B: {secs:.3} s, {:.1} MB/s",
        if write { "write" } else { "read" },
        mb / secs
    );
}
