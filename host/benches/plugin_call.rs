//! What the plugin boundary costs per call: a 4 KiB read of the discard plugin (whose read
//! does nothing, so only the call path is measured), called
//! - directly: the plugin's Rust code linked into this binary, static dispatch;
//! - through the loaded `.so`: abi_stable trait object, `RResult`, `catch_unwind`;
//! - through the loaded `.so` behind the host's guard: what a guest request pays.
//!
//! Run: `cargo bench -p xen-disk-host --bench plugin_call` (builds `libdiscard.so` first).
//! The goal is ≤ 20 ns more per call through the `.so` than directly.

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use std::path::PathBuf;
use xen_disk_host::plugin::{load, GuardedDisk};
use xen_disk_plugin_api::{with_read_bufs, Config, Disk, Plugin};

fn built_plugin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("bench executable");
    let dir = exe
        .parent()
        .and_then(|p| p.parent())
        .expect("target/<profile>")
        .to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "-p", "xen-disk-plugin-discard"]);
    if dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    assert!(cmd.status().expect("cargo build").success());
    dir.join(format!("lib{name}.so"))
}

fn bench(c: &mut Criterion) {
    let config = Config::new();
    let mut buf = vec![0u8; 4096];
    let mut g = c.benchmark_group("read_4k");

    let mut cfg = config.clone();
    cfg.validate("discard", discard::DiscardPlugin::CONFIG_KEYS, &[])
        .unwrap();
    let direct = discard::DiscardPlugin::open(&cfg).unwrap();
    g.bench_function("direct", |b| {
        b.iter(|| {
            with_read_bufs(&mut [&mut buf], |r| {
                black_box(&direct).read(black_box(0), r)
            })
            .unwrap()
        })
    });

    let plugin = load(&built_plugin("discard")).expect("load libdiscard.so");
    let loaded = plugin.open(&config).unwrap();
    g.bench_function("loaded_so", |b| {
        b.iter(|| {
            with_read_bufs(&mut [&mut buf], |r| {
                black_box(&loaded).read(black_box(0), r)
            })
            .unwrap()
        })
    });

    let guarded = GuardedDisk::new(Box::new(plugin.open(&config).unwrap()), false).unwrap();
    g.bench_function("loaded_so_guarded", |b| {
        b.iter(|| {
            with_read_bufs(&mut [&mut buf], |r| {
                black_box(&guarded).read(black_box(0), r)
            })
            .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
