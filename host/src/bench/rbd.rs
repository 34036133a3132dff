//! The RBD reference: Ceph's own `rbd bench` on the same image of the same cluster, with the
//! same pattern and block size, as many operations in flight (`--io-threads`) as the host has
//! workers, and about as many bytes as the plugin moved, so both run about as long. It is
//! librbd's asynchronous API with no Xen ring, grant or plugin boundary in the way: what a
//! `ceph-rbd` disk can at best reach.

use super::direct::Pattern;
use std::process::{Command, Stdio};
use xen_disk_plugin_api::Config;

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
    let (io_type, io_pattern) = match pattern {
        Pattern::Read => ("read", "seq"),
        Pattern::Randread => ("read", "rand"),
        Pattern::Write => ("write", "seq"),
        Pattern::Randwrite => ("write", "rand"),
    };
    let total = total.max((bs * io_threads.max(1)) as u64);
    let out = cmd
        .args(["bench", "--io-type", io_type, "--io-pattern", io_pattern])
        .args(["--io-size", &bs.to_string()])
        .args(["--io-threads", &io_threads.max(1).to_string()])
        .args(["--io-total", &total.to_string()])
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
    fn reads_the_summary_line() {
        let text = "bench  type read io_size 4096 io_threads 8 bytes 1073741824 pattern random\n  SEC       OPS   OPS/SEC   BYTES/SEC\n    1     40000   40000.1   156 MiB/s\nelapsed: 5   ops: 200000   ops/sec: 39812.5   bytes/sec: 156 MiB/s\n";
        let r = parse_summary(text, 4096).unwrap();
        assert_eq!(r.iops, 39812.5);
        assert!((r.mbps - 39812.5 * 4096.0 / 1e6).abs() < 1e-6);
        assert!(parse_summary("rbd: error opening image", 4096).is_none());
    }
}
