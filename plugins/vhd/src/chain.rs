//! Finding a differencing disk's parent: the parent locators (W2ru, W2ku, MacX, and the
//! deprecated ANSI Wi2r and Wi2k that old tools wrote), then the
//! header's parent name, each relative to the child's directory.

use crate::header::{Header, PLAT_MACX, PLAT_W2KU, PLAT_W2RU, PLAT_WI2K, PLAT_WI2R};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Candidate parent paths, best first. Locator bytes outside the file are skipped.
pub fn parent_candidates(
    child: &Path,
    file: &std::fs::File,
    file_len: u64,
    h: &Header,
) -> Vec<PathBuf> {
    let dir = child.parent().unwrap_or(Path::new("."));
    let mut names = Vec::new();
    for l in &h.locators {
        if l.len == 0
            || l.len > 65536
            || l.offset
                .checked_add(u64::from(l.len))
                .is_none_or(|e| e > file_len)
        {
            continue;
        }
        let mut buf = vec![0u8; l.len as usize];
        if file.read_exact_at(&mut buf, l.offset).is_err() {
            continue;
        }
        let text = match l.code {
            PLAT_W2RU | PLAT_W2KU => {
                let u: Vec<u16> = buf
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .take_while(|&u| u != 0)
                    .collect();
                String::from_utf16_lossy(&u)
            }
            PLAT_WI2R | PLAT_WI2K => String::from_utf8_lossy(&buf)
                .trim_end_matches('\0')
                .to_string(),
            PLAT_MACX => {
                let s = String::from_utf8_lossy(&buf)
                    .trim_end_matches('\0')
                    .to_string();
                s.strip_prefix("file://").unwrap_or(&s).to_string()
            }
            _ => continue,
        };
        names.push(text.replace('\\', "/"));
    }
    if !h.parent_name.is_empty() {
        names.push(h.parent_name.replace('\\', "/"));
    }
    names
        .into_iter()
        .filter(|n| !n.is_empty())
        .map(|n| {
            let n = n.strip_prefix("./").unwrap_or(&n).to_string();
            let p = PathBuf::from(&n);
            if p.is_absolute() {
                p
            } else {
                dir.join(p)
            }
        })
        .collect()
}
