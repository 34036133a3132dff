//! Backing files: the chain of raw and qcow2 images that unallocated clusters fall through to.
//!
//! The chain is opened read-only, the backing format from the header extension is honoured
//! (probed by magic only when absent), and loops and over-long chains are refused.

use crate::image::Image;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use xen_disk_plugin_api::{Error, Extent, Result};

/// Longest backing chain accepted.
pub const MAX_CHAIN: usize = 16;

/// One backing image.
pub enum Backing {
    Raw { name: String, file: File, size: u64 },
    Qcow2(Box<Image>),
}

impl Backing {
    /// Opens `file_name` (relative to the directory of `child`) as `format`.
    pub fn open(
        child: &Path,
        file_name: &str,
        format: Option<&str>,
        chain: &[PathBuf],
    ) -> Result<Backing> {
        let child_name = child.display().to_string();
        let path = match Path::new(file_name) {
            p if p.is_absolute() => p.to_path_buf(),
            p => child.parent().unwrap_or(Path::new(".")).join(p),
        };
        let canon = path.canonicalize().map_err(|e| {
            Error::io(
                e.raw_os_error().unwrap_or(libc_enoent()),
                format!("{child_name}: backing file {}: {e}", path.display()),
            )
        })?;
        if chain.contains(&canon) {
            return Err(Error::corrupt(format!(
                "{child_name}: backing file {} makes a loop",
                canon.display()
            )));
        }
        if chain.len() >= MAX_CHAIN {
            return Err(Error::corrupt(format!(
                "{child_name}: backing chain longer than {MAX_CHAIN}"
            )));
        }
        let format = match format {
            Some(f) => f.to_string(),
            None => {
                let f = File::open(&canon).map_err(|e| io_err(&canon, e))?;
                let mut m = [0u8; 4];
                let n = f.read_at(&mut m, 0).map_err(|e| io_err(&canon, e))?;
                if n == 4 && u32::from_be_bytes(m) == crate::header::MAGIC {
                    "qcow2".into()
                } else {
                    "raw".into()
                }
            }
        };
        match format.as_str() {
            "raw" => {
                let file = File::open(&canon).map_err(|e| io_err(&canon, e))?;
                let size = file.metadata().map_err(|e| io_err(&canon, e))?.len();
                Ok(Backing::Raw {
                    name: canon.display().to_string(),
                    file,
                    size,
                })
            }
            "qcow2" => {
                let mut chain = chain.to_vec();
                chain.push(canon.clone());
                Ok(Backing::Qcow2(Box::new(Image::open(&canon, true, &chain)?)))
            }
            other => Err(Error::unsupported(&format!(
                "{child_name}: backing format {other:?}"
            ))),
        }
    }

    /// Reads `buf.len()` bytes at `offset`; bytes past the backing image's end read as zero.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        match self {
            Backing::Raw { name, file, size } => {
                let avail = size.saturating_sub(offset).min(buf.len() as u64) as usize;
                file.read_exact_at(&mut buf[..avail], offset).map_err(|e| {
                    Error::io(e.raw_os_error().unwrap_or(5), format!("{name}: read: {e}"))
                })?;
                buf[avail..].fill(0);
                Ok(())
            }
            Backing::Qcow2(img) => {
                let avail = img.size().saturating_sub(offset).min(buf.len() as u64) as usize;
                img.read_at(offset, &mut buf[..avail])?;
                buf[avail..].fill(0);
                Ok(())
            }
        }
    }
}

impl Backing {
    /// Block status of `[offset, offset + len)` as the child reads it: past the backing
    /// image's end is a hole reading zeroes; a raw backing file is data.
    pub fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let size = match self {
            Backing::Raw { size, .. } => *size,
            Backing::Qcow2(img) => img.size(),
        };
        let avail = size.saturating_sub(offset).min(len);
        let mut out = Vec::new();
        if avail > 0 {
            match self {
                Backing::Raw { file, .. } => out.extend(raw_extents(file, offset, avail)),
                Backing::Qcow2(img) => {
                    let mut pos = offset;
                    while pos < offset + avail {
                        let got = img.extents(pos, offset + avail - pos)?;
                        let n: u64 = got.iter().map(|e| e.len).sum();
                        out.extend(got);
                        if n == 0 {
                            break;
                        }
                        pos += n;
                    }
                }
            }
        }
        if avail < len {
            out.push(Extent::hole(len - avail));
        }
        Ok(out)
    }
}

/// A raw backing file's holes and data from `SEEK_DATA`/`SEEK_HOLE`, on 512-byte sectors
/// (a sector a boundary cuts is data); all data where the seeks are not supported.
fn raw_extents(file: &File, offset: u64, len: u64) -> Vec<Extent> {
    use std::os::fd::AsRawFd;
    let seek = |pos: u64, whence| {
        // SAFETY: plain integer arguments on a descriptor we own; only the result is used
        // (reads are positional, so the file offset matters to nothing).
        let r = unsafe { libc::lseek(file.as_raw_fd(), pos as libc::off_t, whence) };
        match r {
            r if r >= 0 => Ok(r as u64),
            _ if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) => Err(true),
            _ => Err(false),
        }
    };
    let end = offset + len;
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end {
        let data = match seek(pos, libc::SEEK_DATA) {
            Ok(d) => d,
            Err(true) => end,
            Err(false) => {
                out.push(Extent::data(end - pos));
                break;
            }
        };
        let hole_end = (data.min(end) / 512 * 512).max(pos);
        if hole_end > pos {
            out.push(Extent::hole(hole_end - pos));
            pos = hole_end;
            continue;
        }
        let hole = seek(pos, libc::SEEK_HOLE).unwrap_or(end);
        let data_end = (hole.min(end).div_ceil(512) * 512).clamp(pos + 512, end);
        out.push(Extent::data(data_end - pos));
        pos = data_end;
    }
    out
}

fn libc_enoent() -> i32 {
    2
}

pub fn io_err(path: &Path, e: std::io::Error) -> Error {
    Error::io(
        e.raw_os_error().unwrap_or(5),
        format!("{}: {e}", path.display()),
    )
}
