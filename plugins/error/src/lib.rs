//! `error`: a filter that fails requests to its base disk with I/O errors, for testing how
//! guests and stacks handle a failing disk.
//!
//! | key | type | default | meaning |
//! |---|---|---|---|
//! | `read_rate` | string | `0.0` | fraction of reads to fail, from 0 to 1, written as a decimal (`0.25`, `1.0`: a bare `1` is read as an integer and refused) |
//! | `write_rate` | string | `0.0` | the same for writes, discards and write-zeroes |
//! | `seed` | integer | `1` | seed for the random choice, so a run can be repeated |
//! | `sectors` | string | none | `START-END`: inclusive range of 512-byte sectors; every read or write that overlaps it fails |
//!
//! ```text
//! xen-disk-host sim read error -c sectors=2048-4095 -c base=file -c base.path=disk.img --out x
//! ```
//!
//! A failed request returns an I/O error (`EIO`) without reaching the base; the guest sees
//! `BLKIF_RSP_ERROR`. Flushes are always forwarded. Everything else is the base's: same
//! size, capabilities and thread model (over an asynchronous base, requests that pass go on
//! as submissions).

use std::sync::atomic::{AtomicU64, Ordering};
use xen_disk_plugin_api::*;

/// The filter's disk.
pub struct ErrorDisk {
    base: ForeignDisk,
    read_rate: f64,
    write_rate: f64,
    /// Inclusive byte range `[first, last]` that fails.
    bad: Option<(u64, u64)>,
    rng: AtomicU64,
}

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

impl ErrorDisk {
    /// Decides whether the request `[offset, offset + len)` fails.
    fn check(&self, what: &str, offset: u64, len: u64, rate: f64) -> Result<()> {
        if let Some((first, last)) = self.bad {
            if len > 0 && offset <= last && offset + len > first {
                return Err(Error::io(
                    libc::EIO,
                    format!(
                        "error filter: {what} of sectors {}-{} overlaps the failing sectors {}-{}",
                        offset / 512,
                        (offset + len - 1) / 512,
                        first / 512,
                        last / 512
                    ),
                ));
            }
        }
        if rate > 0.0 {
            let prev = self
                .rng
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |x| Some(xorshift(x)))
                .unwrap_or(1);
            // 53 random bits make a uniform float in [0, 1).
            let draw = (xorshift(prev) >> 11) as f64 / (1u64 << 53) as f64;
            if draw < rate {
                return Err(Error::io(
                    libc::EIO,
                    format!(
                        "error filter: random {what} failure at sector {}",
                        offset / 512
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl Disk for ErrorDisk {
    fn info(&self) -> DiskInfo {
        self.base.info()
    }
    fn read(&self, offset: u64, bufs: &mut ReadBufs<'_>) -> Result<()> {
        self.check("read", offset, bufs.len() as u64, self.read_rate)?;
        self.base.read(offset, bufs)
    }
    fn write(&self, offset: u64, bufs: &WriteBufs<'_>) -> Result<()> {
        self.check("write", offset, bufs.len() as u64, self.write_rate)?;
        self.base.write(offset, bufs)
    }
    fn write_fua(&self, offset: u64, bufs: &WriteBufs<'_>) -> Result<()> {
        self.check("write", offset, bufs.len() as u64, self.write_rate)?;
        self.base.write_fua(offset, bufs)
    }
    fn flush(&self) -> Result<()> {
        self.base.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check("discard", offset, len, self.write_rate)?;
        self.base.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check("write-zeroes", offset, len, self.write_rate)?;
        self.base.write_zeroes(offset, len)
    }
    /// Over an asynchronous base (the thread model is the base's), a request that passes
    /// goes on as a submission: served by the blocking calls, it would wait on the host's
    /// ring thread.
    fn submit(&self, submission: Submission) {
        let (what, rate) = match submission.op() {
            SubmitOp::Read => ("read", self.read_rate),
            SubmitOp::Write | SubmitOp::WriteFua => ("write", self.write_rate),
        };
        let len = submission.len() as u64;
        match self.check(what, submission.offset(), len, rate) {
            Ok(()) => self.base.submit(submission),
            Err(e) => submission.complete(Err(e)),
        }
    }
}

fn rate(config: &Config, key: &str) -> Result<f64> {
    let text = config.str(key)?;
    match text.trim().parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(Error::config(
            key,
            format!("`{text}` is not a fraction from 0 to 1 (e.g. 0.25)"),
        )),
    }
}

/// Parses `START-END` (inclusive sectors) into an inclusive byte range inside `size`.
fn sectors(text: &str, size: u64) -> Result<(u64, u64)> {
    let bad = |why: &str| Error::config("sectors", format!("`{text}`: {why}"));
    let (a, b) = text
        .split_once('-')
        .ok_or_else(|| bad("expected START-END, e.g. 2048-4095"))?;
    let parse = |s: &str| {
        s.trim()
            .parse::<u64>()
            .map_err(|_| bad("START and END must be sector numbers"))
    };
    let (start, end) = (parse(a)?, parse(b)?);
    if start > end {
        return Err(bad("START is after END"));
    }
    if start >= size / 512 {
        return Err(bad(&format!("the disk has only {} sectors", size / 512)));
    }
    Ok((start * 512, end.saturating_mul(512).saturating_add(511)))
}

/// The filter.
pub struct ErrorFilter;

impl Filter for ErrorFilter {
    type Disk = ErrorDisk;
    const NAME: &'static str = "error";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "Fails a fraction of requests, or those touching a sector range, with I/O errors";
    const CONFIG_KEYS: &'static [ConfigKey] = &[
        ConfigKey::optional(
            "read_rate",
            KeyType::String,
            "0.0",
            "Fraction of reads to fail (0 to 1)",
        ),
        ConfigKey::optional(
            "write_rate",
            KeyType::String,
            "0.0",
            "Fraction of writes to fail (0 to 1)",
        ),
        ConfigKey::optional(
            "seed",
            KeyType::Integer,
            "1",
            "Seed for the random failures",
        ),
        ConfigKey::maybe(
            "sectors",
            KeyType::String,
            "START-END: fail requests overlapping these 512-byte sectors",
        ),
    ];

    fn open(config: &Config, base: ForeignDisk) -> Result<ErrorDisk> {
        let size = base.info().size;
        let bad = match config.opt_str("sectors")? {
            Some(t) => Some(sectors(t, size)?),
            None => None,
        };
        // xorshift must not start at zero (it would stay there).
        let seed = config.u64("seed")?.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        Ok(ErrorDisk {
            base,
            read_rate: rate(config, "read_rate")?,
            write_rate: rate(config, "write_rate")?,
            bad,
            rng: AtomicU64::new(seed),
        })
    }
}

export_filter!(ErrorFilter);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sector_ranges_parse_and_refuse_nonsense() {
        assert_eq!(sectors("8-15", 1 << 20).unwrap(), (4096, 8191));
        for t in ["8", "a-b", "9-8", "5000-6000"] {
            let e = sectors(t, 1 << 20).unwrap_err();
            assert!(e.message().contains("sectors"), "{t}: {e}");
        }
    }
}
