//! The NBD reference: nbdkit's `null` plugin driven by fio's `nbd` engine with the same
//! pattern, block size, depth and duration, over a Unix socket. nbdkit is the yardstick for
//! plugin frameworks; its null plugin, like our `discard`, measures the transport alone.

use super::direct::Pattern;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What fio measured.
#[derive(Debug, Clone, Copy)]
pub struct NbdFigures {
    /// Operations per second.
    pub iops: f64,
    /// Megabytes (10^6) per second.
    pub mbps: f64,
}

/// Kills nbdkit when the measurement ends, however it ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs fio against a fresh `nbdkit null` of `size` bytes.
pub fn run(
    pattern: Pattern,
    bs: usize,
    iodepth: usize,
    size: u64,
    duration: Duration,
) -> Result<NbdFigures, String> {
    let dir = std::env::temp_dir().join(format!("xen-disk-nbdkit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let socket = dir.join("nbd.sock");
    let result = measure(&socket, pattern, bs, iodepth, size, duration);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn measure(
    socket: &Path,
    pattern: Pattern,
    bs: usize,
    iodepth: usize,
    size: u64,
    duration: Duration,
) -> Result<NbdFigures, String> {
    let server = Command::new("nbdkit")
        .args(["--foreground", "--exit-with-parent", "-U"])
        .arg(socket)
        .args(["null", &size.to_string()])
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("nbdkit: {e} (install nbdkit for the NBD reference)"))?;
    let _server = Server(server);
    let ready = Instant::now();
    while !socket.exists() {
        if ready.elapsed() > Duration::from_secs(10) {
            return Err("nbdkit did not create its socket within 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let rw = match pattern {
        Pattern::Read => "read",
        Pattern::Write => "write",
        Pattern::Randread => "randread",
        Pattern::Randwrite => "randwrite",
    };
    let out = Command::new("fio")
        .args([
            "--name=nbdkit-null",
            "--ioengine=nbd",
            &format!("--uri=nbd+unix:///?socket={}", socket.display()),
            &format!("--rw={rw}"),
            &format!("--bs={bs}"),
            &format!("--iodepth={iodepth}"),
            &format!("--runtime={}ms", duration.as_millis().max(1)),
            "--time_based",
            "--output-format=terse",
            "--terse-version=3",
        ])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("fio: {e} (install fio for the NBD reference)"))?;
    if !out.status.success() {
        return Err(format!(
            "fio failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    parse_terse(
        &text,
        matches!(pattern, Pattern::Read | Pattern::Randread),
        bs,
    )
    .ok_or_else(|| format!("fio printed no terse result line: {}", text.trim()))
}

/// Terse version 3: field 8 is read IOPS, field 49 write IOPS (1-based).
fn parse_terse(text: &str, reading: bool, bs: usize) -> Option<NbdFigures> {
    let line = text.lines().find(|l| l.starts_with("3;"))?;
    let fields: Vec<&str> = line.split(';').collect();
    let iops: f64 = fields.get(if reading { 7 } else { 48 })?.parse().ok()?;
    Some(NbdFigures {
        iops,
        mbps: iops * bs as f64 / 1e6,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_iops_fields_of_a_terse_line() {
        let mut fields = vec!["0"; 130];
        fields[0] = "3";
        fields[7] = "1000";
        fields[48] = "250";
        let line = fields.join(";");
        let r = parse_terse(&line, true, 4096).unwrap();
        assert_eq!(r.iops, 1000.0);
        assert!((r.mbps - 4.096).abs() < 1e-9);
        assert_eq!(parse_terse(&line, false, 4096).unwrap().iops, 250.0);
        assert!(parse_terse("fio: something odd", true, 4096).is_none());
    }
}
