//! The NBD reference: nbdkit's `null` plugin driven by fio's `nbd` engine with the same
//! pattern, block size, depth and duration, over a Unix socket. nbdkit is the yardstick for
//! plugin frameworks; its null plugin, like our `discard`, measures the transport alone.

use super::direct::Pattern;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use super::fio_nbd::NbdFigures;

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
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    super::fio_nbd::run(&uri, pattern, bs, iodepth, size, duration)
}

#[cfg(test)]
mod tests {
    use super::super::fio_nbd::parse_terse;

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
