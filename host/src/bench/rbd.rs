//! The RBD reference: Ceph's own `rbd bench` on the same image of the same cluster, with the
//! same pattern and block size, as many operations in flight (`--io-threads`) as the host has
//! workers, and about as many bytes as the plugin moved, so both run about as long. It is
//! librbd's asynchronous API with no Xen ring, grant or plugin boundary in the way: what a
//! `ceph-rbd` disk can at best reach.

use super::direct::Pattern;
use std::process::{Command, Stdio};
use xen_disk_plugin_api::Config;

/// `rbd bench`'s sequential pattern that matches the ring bench's: `io_threads` neighbouring
/// blocks in flight, the window walking the whole image and wrapping to its start. Its `seq`
/// pattern splits the image among the threads instead, and once `--io-total` exceeds the image
/// it sends every thread back to the start of its share after each round: from then on it
/// reads the same `io_threads` blocks over and over, and the OSD sends them with the data
/// checksums it computed the first time (1 MiB reads of a 1 GiB image on the one-node lab:
/// 4.1k IOPS with `seq`, 4.0k with `full-seq`, and the checksums' 15% of the OSD's CPU gone).
const SEQUENTIAL: &str = "full-seq";

/// What `rbd bench` measured.
#[derive(Debug, Clone, Copy)]
pub struct RbdFigures {
    /// Operations per second.
    pub iops: f64,
    /// Megabytes (10^6) per second.
    pub mbps: f64,
}

/// Runs `rbd bench` against the image a `ceph-rbd` configuration names (`pool`, `image`,
/// `conf`, `id`, `keyring`), moving `total` bytes.
pub fn run(
    config: &Config,
    pattern: Pattern,
    bs: usize,
    io_threads: usize,
    total: u64,
) -> Result<RbdFigures, String> {
    let key = |k: &str| config.value(k).and_then(|v| v.as_str()).map(str::to_string);
    let image = key("image").ok_or("needs the ceph-rbd configuration (-c image=...)")?;
    if key("snapshot").is_some() {
        return Err("rbd bench cannot run on a snapshot".into());
    }
    let pool = key("pool").unwrap_or_else(|| "rbd".into());
    let mut cmd = Command::new("rbd");
    if let Some(conf) = key("conf") {
        cmd.args(["-c", &conf]);
    }
    if let Some(id) = key("id") {
        cmd.args(["--id", &id]);
    }
    if let Some(keyring) = key("keyring") {
        cmd.args(["--keyring", &keyring]);
    }
    let out = cmd
        .args(bench_args(pattern, bs, io_threads, total))
        .arg(format!("{pool}/{image}"))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("rbd: {e} (install ceph-common for the rbd bench reference)"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "rbd bench failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    parse_summary(&text, bs)
        .ok_or_else(|| format!("rbd bench printed no summary line: {}", text.trim()))
}

/// `rbd bench`'s arguments for the pattern, block size, operations in flight and bytes.
fn bench_args(pattern: Pattern, bs: usize, io_threads: usize, total: u64) -> Vec<String> {
    let (io_type, io_pattern) = match pattern {
        Pattern::Read => ("read", SEQUENTIAL),
        Pattern::Randread => ("read", "rand"),
        Pattern::Write => ("write", SEQUENTIAL),
        Pattern::Randwrite => ("write", "rand"),
    };
    let io_threads = io_threads.max(1);
    let total = total.max((bs * io_threads) as u64);
    [
        "bench",
        "--io-type",
        io_type,
        "--io-pattern",
        io_pattern,
        "--io-size",
        &bs.to_string(),
        "--io-threads",
        &io_threads.to_string(),
        "--io-total",
        &total.to_string(),
    ]
    .map(str::to_string)
    .to_vec()
}

/// The closing line: `elapsed: 5   ops: 262144   ops/sec: 51478.5   bytes/sec: 201 MiB/s`.
fn parse_summary(text: &str, bs: usize) -> Option<RbdFigures> {
    let line = text.lines().rev().find(|l| l.starts_with("elapsed:"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "ops/sec:")?;
    let iops: f64 = words.get(at + 1)?.parse().ok()?;
    Some(RbdFigures {
        iops,
        mbps: iops * bs as f64 / 1e6,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_patterns_walk_the_whole_image_and_random_ones_stay_random() {
        let arg = |pattern, name: &str| {
            let args = bench_args(pattern, 1 << 20, 16, 1 << 34);
            let at = args.iter().position(|a| a == name).unwrap();
            args[at + 1].clone()
        };
        // `seq` would re-read the same 16 blocks once 16 GiB exceeds the image.
        assert_eq!(arg(Pattern::Read, "--io-pattern"), "full-seq");
        assert_eq!(arg(Pattern::Write, "--io-pattern"), "full-seq");
        assert_eq!(arg(Pattern::Randread, "--io-pattern"), "rand");
        assert_eq!(arg(Pattern::Randwrite, "--io-type"), "write");
        assert_eq!(arg(Pattern::Read, "--io-threads"), "16");
        assert_eq!(arg(Pattern::Read, "--io-total"), (1u64 << 34).to_string());
        // Never fewer bytes than one round of the threads.
        let args = bench_args(Pattern::Randread, 4096, 0, 0);
        let total = args.iter().position(|a| a == "--io-total").unwrap();
        assert_eq!(args[total + 1], "4096");
    }

    #[test]
    fn reads_the_summary_line() {
        let text = "bench  type read io_size 4096 io_threads 8 bytes 1073741824 pattern random\n  SEC       OPS   OPS/SEC   BYTES/SEC\n    1     40000   40000.1   156 MiB/s\nelapsed: 5   ops: 200000   ops/sec: 39812.5   bytes/sec: 156 MiB/s\n";
        let r = parse_summary(text, 4096).unwrap();
        assert_eq!(r.iops, 39812.5);
        assert!((r.mbps - 39812.5 * 4096.0 / 1e6).abs() < 1e-6);
        assert!(parse_summary("rbd: error opening image", 4096).is_none());
    }
}
