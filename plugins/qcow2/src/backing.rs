//! Backing files: the chain of raw and qcow2 images that unallocated clusters fall through to.
//!
//! The chain is opened read-only, the backing format from the header extension is honoured
//! (probed by magic only when absent), and loops and over-long chains are refused.

use crate::image::Image;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use xen_disk_plugin_api::{Error, Result};

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

fn libc_enoent() -> i32 {
    2
}

pub fn io_err(path: &Path, e: std::io::Error) -> Error {
    Error::io(
        e.raw_os_error().unwrap_or(5),
        format!("{}: {e}", path.display()),
    )
}
