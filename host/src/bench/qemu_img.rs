//! The image-format reference: `qemu-img bench` on the same image, with the same pattern,
//! block size, depth and number of requests as the plugin's direct run.
//!
//! qemu-img bench only walks sequentially, so only `read` and `write` compare. The plugin
//! runs first, one pass over the region; qemu-img then repeats that pass. Reads use the image
//! itself (the plugin's pass left it warm in the page cache, as the pre-read leaves it for the
//! plugin); writes use a copy taken before the plugin wrote, so both start from the same
//! allocation state (a fresh image stays fresh for both). Both use the page cache
//! (`-t writeback`) and neither run's time includes a final flush.

use super::direct::Pattern;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What qemu-img measured.
#[derive(Debug, Clone, Copy)]
pub struct QemuImgFigures {
    /// Requests made.
    pub ops: u64,
    /// Seconds qemu-img reports for them ("Run completed in").
    pub seconds: f64,
    /// Megabytes (10^6) per second.
    pub mbps: f64,
}

/// A copy of the image for qemu-img's write pass, removed when dropped.
pub struct Snapshot {
    path: PathBuf,
}

impl Snapshot {
    /// Copies `image` beside itself before the plugin opens it.
    pub fn take(image: &Path) -> Result<Snapshot, String> {
        let mut name = image.as_os_str().to_owned();
        name.push(format!(".qemu-img-ref-{}", std::process::id()));
        let path = PathBuf::from(name);
        std::fs::copy(image, &path)
            .map_err(|e| format!("copying {} for qemu-img: {e}", image.display()))?;
        Ok(Snapshot { path })
    }

    /// Where the copy is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether qemu-img bench can repeat `pattern`.
pub fn supports(pattern: Pattern) -> bool {
    matches!(pattern, Pattern::Read | Pattern::Write)
}

/// Runs `qemu-img bench -f FORMAT` over `count` requests of `bs` bytes from offset 0, `depth`
/// in flight, on `image`.
pub fn run(
    format: &str,
    image: &Path,
    pattern: Pattern,
    bs: usize,
    count: u64,
    depth: usize,
) -> Result<QemuImgFigures, String> {
    if !supports(pattern) {
        return Err("qemu-img bench only has sequential read and write patterns".into());
    }
    let mut cmd = Command::new("qemu-img");
    cmd.args(["bench", "-f", format, "-t", "writeback", "-i", "threads"])
        .args(["-d", &depth.max(1).to_string()])
        .args(["-c", &count.to_string(), "-s", &bs.to_string()]);
    if pattern == Pattern::Write {
        // The byte the direct run writes, so a zero-detecting format gains nothing.
        cmd.args(["-w", "--pattern", "90"]);
    }
    cmd.arg(image);
    let out = cmd
        .output()
        .map_err(|e| format!("qemu-img (package qemu-utils) could not run: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "qemu-img bench -f {format} {}: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let seconds = completed_seconds(&text)
        .ok_or_else(|| format!("no \"Run completed in\" in qemu-img's output: {text}"))?;
    // Its clock has millisecond resolution; a run that fast says nothing.
    if seconds < 0.005 {
        return Err(format!(
            "qemu-img's run took {seconds} s: too short to compare, raise --region or --bs"
        ));
    }
    Ok(QemuImgFigures {
        ops: count,
        seconds,
        mbps: count as f64 * bs as f64 / seconds / 1e6,
    })
}

/// The seconds in qemu-img bench's "Run completed in 1.234 seconds." line.
pub fn completed_seconds(stdout: &str) -> Option<f64> {
    stdout
        .split("Run completed in ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_completion_line() {
        let out = "Sending 100 read requests, 4096 bytes each, 1 in parallel (starting at offset 0, step size 4096)\nRun completed in 0.042 seconds.\n";
        assert_eq!(completed_seconds(out), Some(0.042));
        assert_eq!(completed_seconds("Sending 1 read request"), None);
        assert_eq!(completed_seconds("Run completed in soon seconds."), None);
    }

    #[test]
    fn random_patterns_are_refused() {
        assert!(supports(Pattern::Read) && supports(Pattern::Write));
        let e = run(
            "raw",
            Path::new("/nonexistent"),
            Pattern::Randread,
            4096,
            1,
            1,
        )
        .unwrap_err();
        assert!(e.contains("sequential"), "{e}");
    }
}
