//! One open VHD file and its parent chain: opening (validate footer, header, BAT, parent),
//! reading through the chain, and writing with allocation in this file only.
//!
//! Allocation order (crash-safe by order on a process crash; `flush` adds fdatasync): the new
//! block's data, then its bitmap (which overwrites the old footer), then the BAT entry, then
//! the footer at the new end. A crash between steps leaves an unreferenced tail that the
//! next open ignores, recovering the footer from its copy in sector 0.

use crate::bat::{self, UNALLOCATED};
use crate::bitmap;
use crate::chain;
use crate::footer::{DiskType, Footer, FOOTER_SIZE};
use crate::header::{Header, HEADER_SIZE};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use xen_disk_plugin_api::{Error, Result};

/// Deepest parent chain accepted.
pub const MAX_DEPTH: usize = 64;

/// The sparse part of a dynamic or differencing image.
#[derive(Debug)]
pub struct Sparse {
    pub header: Header,
    pub bat: Vec<u32>,
    pub bitmap_size: u64,
    /// Where the next block goes (the end of data; the footer follows it).
    pub next_free: u64,
    pub parent: Option<Box<Image>>,
}

/// An open VHD.
#[derive(Debug)]
pub struct Image {
    pub path: PathBuf,
    pub file: File,
    pub footer: Footer,
    pub sparse: Option<Sparse>,
}

fn io(path: &Path, what: &str, e: std::io::Error) -> Error {
    Error::from(e).context(format!("{}: {what}", path.display()))
}

fn read_at(file: &File, path: &Path, buf: &mut [u8], off: u64, what: &str) -> Result<()> {
    file.read_exact_at(buf, off).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::corrupt(format!(
                "{}: {what} at {off:#x} lies past the end of the file",
                path.display()
            ))
        } else {
            io(path, what, e)
        }
    })
}

impl Image {
    /// Opens `path` and, for a differencing disk, its parents (read-only).
    pub fn open(path: &Path, writable: bool) -> Result<Image> {
        let mut seen = Vec::new();
        Self::open_in_chain(path, writable, &mut seen)
    }

    fn open_in_chain(path: &Path, writable: bool, seen: &mut Vec<PathBuf>) -> Result<Image> {
        let canon = path.canonicalize().map_err(|e| io(path, "open", e))?;
        if seen.contains(&canon) {
            return Err(Error::corrupt(format!(
                "{}: parent chain loops back to this file",
                path.display()
            )));
        }
        if seen.len() >= MAX_DEPTH {
            return Err(Error::corrupt(format!(
                "{}: parent chain deeper than {MAX_DEPTH}",
                path.display()
            )));
        }
        seen.push(canon);
        let name = path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| io(path, "open", e))?;
        let len = file.metadata().map_err(|e| io(path, "stat", e))?.len();
        if len < FOOTER_SIZE as u64 {
            return Err(Error::corrupt(format!(
                "{name}: {len} bytes is too short for a VHD footer"
            )));
        }
        let mut raw = [0u8; FOOTER_SIZE];
        read_at(&file, path, &mut raw, len - 512, "footer")?;
        let end_footer = Footer::parse(&raw, &name);
        let footer_ok = end_footer.is_ok();
        let footer = match end_footer {
            Ok(f) => f,
            Err(end_err) => {
                // A crash during allocation can leave no footer at the end; sparse images
                // keep a copy in sector 0.
                read_at(&file, path, &mut raw, 0, "footer copy")?;
                match Footer::parse(&raw, &name) {
                    Ok(f) if f.disk_type != DiskType::Fixed => f,
                    _ => return Err(end_err),
                }
            }
        };
        if footer.disk_type == DiskType::Fixed {
            if footer.current_size > len - 512 {
                return Err(Error::corrupt(format!(
                    "{name}: footer current size {} exceeds the {} data bytes in the file",
                    footer.current_size,
                    len - 512
                )));
            }
            return Ok(Image {
                path: path.to_path_buf(),
                file,
                footer,
                sparse: None,
            });
        }
        let hoff = footer.data_offset;
        if hoff < 512 || hoff.checked_add(HEADER_SIZE as u64).is_none_or(|e| e > len) {
            return Err(Error::corrupt(format!(
                "{name}: footer data offset {hoff:#x} is outside the file"
            )));
        }
        let mut hraw = [0u8; HEADER_SIZE];
        read_at(&file, path, &mut hraw, hoff, "dynamic header")?;
        let header = Header::parse(&hraw, &name)?;
        let need = footer.current_size.div_ceil(u64::from(header.block_size));
        if u64::from(header.max_table_entries) < need {
            return Err(Error::corrupt(format!(
                "{name}: dynamic header max table entries {} is below the {need} blocks of the disk",
                header.max_table_entries
            )));
        }
        let bat_bytes = (u64::from(header.max_table_entries) * 4).next_multiple_of(512);
        let bat_end = header.table_offset.saturating_add(bat_bytes);
        if header.table_offset < 512 || bat_end > len {
            return Err(Error::corrupt(format!(
                "{name}: BAT at {:#x} ({bat_bytes} bytes) is outside the file",
                header.table_offset
            )));
        }
        if header.table_offset < hoff + HEADER_SIZE as u64 && hoff < bat_end {
            return Err(Error::corrupt(format!(
                "{name}: BAT overlaps the dynamic header"
            )));
        }
        let mut raw_bat = vec![0u8; (need * 4) as usize];
        read_at(&file, path, &mut raw_bat, header.table_offset, "BAT")?;
        let mut meta_end = bat_end.max(hoff + HEADER_SIZE as u64);
        for l in &header.locators {
            if let Some(e) = l.offset.checked_add(u64::from(l.len)) {
                if e <= len {
                    meta_end = meta_end.max(e.next_multiple_of(512));
                }
            }
        }
        let bitmap_size = header.bitmap_size();
        let span = bitmap_size + u64::from(header.block_size);
        // Data must end before a footer; with a crash-torn tail, anywhere before EOF.
        let (bat, next_free) = bat::parse(
            &raw_bat,
            need as usize,
            span,
            meta_end,
            if footer_ok { len - 512 } else { len },
            &name,
        )?;
        let parent = if footer.disk_type == DiskType::Differencing {
            let cands = chain::parent_candidates(path, &file, len, &header);
            let Some(found) = cands.iter().find(|p| p.exists()) else {
                return Err(Error::corrupt(format!(
                    "{name}: parent {:?} not found (tried {})",
                    header.parent_name,
                    cands
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            };
            let p = Image::open_in_chain(found, false, seen)?;
            if p.footer.unique_id != header.parent_uuid {
                return Err(Error::corrupt(format!(
                    "{name}: parent {} has UUID {}, the header expects {}",
                    found.display(),
                    hex(&p.footer.unique_id),
                    hex(&header.parent_uuid)
                )));
            }
            if p.footer.current_size != footer.current_size {
                return Err(Error::corrupt(format!(
                    "{name}: parent {} is {} bytes, this disk {}",
                    found.display(),
                    p.footer.current_size,
                    footer.current_size
                )));
            }
            Some(Box::new(p))
        } else {
            None
        };
        Ok(Image {
            path: path.to_path_buf(),
            file,
            footer,
            sparse: Some(Sparse {
                header,
                bat,
                bitmap_size,
                next_free,
                parent,
            }),
        })
    }

    pub fn size(&self) -> u64 {
        self.footer.current_size
    }

    /// Reads `buf.len()` bytes at `off` (already bounds-checked against the disk size).
    pub fn read(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        let Some(sp) = &self.sparse else {
            return read_at(&self.file, &self.path, buf, off, "data");
        };
        let bs = u64::from(sp.header.block_size);
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let blk = (pos / bs) as usize;
            let in_blk = pos % bs;
            let n = ((bs - in_blk) as usize).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            let e = sp.bat.get(blk).copied().unwrap_or(UNALLOCATED);
            if e == UNALLOCATED {
                match &sp.parent {
                    Some(p) => p.read(pos, out)?,
                    None => out.fill(0),
                }
            } else {
                let base = u64::from(e) * 512;
                let data = base + sp.bitmap_size + in_blk;
                match &sp.parent {
                    None => read_at(&self.file, &self.path, out, data, "block data")?,
                    Some(p) => {
                        let mut bm = vec![0u8; sp.bitmap_size as usize];
                        read_at(&self.file, &self.path, &mut bm, base, "block bitmap")?;
                        // Runs of sectors with the same bitmap state go in one read.
                        let first = (in_blk / 512) as usize;
                        let mut s = 0usize;
                        while s < n {
                            let here = bitmap::is_set(&bm, first + s / 512);
                            let mut t = s + 512;
                            while t < n && bitmap::is_set(&bm, first + t / 512) == here {
                                t += 512;
                            }
                            let t = t.min(n);
                            if here {
                                read_at(
                                    &self.file,
                                    &self.path,
                                    &mut out[s..t],
                                    data + s as u64,
                                    "block data",
                                )?;
                            } else {
                                p.read(pos + s as u64, &mut out[s..t])?;
                            }
                            s = t;
                        }
                    }
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Writes `buf` at `off` (sector-aligned, bounds-checked), allocating blocks here.
    pub fn write(&mut self, off: u64, buf: &[u8]) -> Result<()> {
        let path = self.path.clone();
        let werr = |e| io(&path, "write", e);
        let Some(sp) = &mut self.sparse else {
            return self.file.write_all_at(buf, off).map_err(werr);
        };
        let bs = u64::from(sp.header.block_size);
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let blk = (pos / bs) as usize;
            let in_blk = pos % bs;
            let n = ((bs - in_blk) as usize).min(buf.len() - done);
            let src = &buf[done..done + n];
            let first = (in_blk / 512) as usize;
            let nsec = n.div_ceil(512);
            if sp.bat[blk] == UNALLOCATED {
                let base = sp.next_free;
                let sector = base / 512;
                if sector >= u64::from(u32::MAX) {
                    return Err(Error::msg(format!(
                        "{}: file too large for BAT offsets",
                        path.display()
                    )));
                }
                // 1. data (the rest of the block reads as zero: the file is extended sparse).
                let block_end = base + sp.bitmap_size + bs;
                self.file
                    .write_all_at(src, base + sp.bitmap_size + in_blk)
                    .map_err(werr)?;
                if self.file.metadata().map_err(werr)?.len() < block_end {
                    self.file.set_len(block_end).map_err(werr)?;
                }
                // 2. bitmap: all present for a dynamic disk; only the written sectors for a
                // differencing one (the rest fall through to the parent).
                let mut bm = vec![0u8; sp.bitmap_size as usize];
                if sp.parent.is_none() {
                    bitmap::set_range(&mut bm, 0, (bs / 512) as usize);
                } else {
                    bitmap::set_range(&mut bm, first, nsec);
                }
                self.file.write_all_at(&bm, base).map_err(werr)?;
                // 3. BAT entry.
                let at = sp.header.table_offset + blk as u64 * 4;
                self.file
                    .write_all_at(&(sector as u32).to_be_bytes(), at)
                    .map_err(werr)?;
                sp.bat[blk] = sector as u32;
                // 4. footer at the new end.
                self.file
                    .write_all_at(&self.footer.raw, block_end)
                    .map_err(werr)?;
                // Drop any tail a crashed allocation left past the new footer.
                if self.file.metadata().map_err(werr)?.len() > block_end + 512 {
                    self.file.set_len(block_end + 512).map_err(werr)?;
                }
                sp.next_free = block_end;
            } else {
                let base = u64::from(sp.bat[blk]) * 512;
                self.file
                    .write_all_at(src, base + sp.bitmap_size + in_blk)
                    .map_err(werr)?;
                if sp.parent.is_some() {
                    // Only the bitmap bytes this write touches are read and rewritten.
                    let lo = first / 8;
                    let hi = (first + nsec).div_ceil(8);
                    let mut part = vec![0u8; hi - lo];
                    read_at(
                        &self.file,
                        &path,
                        &mut part,
                        base + lo as u64,
                        "block bitmap",
                    )?;
                    let before = part.clone();
                    let mut full = vec![0u8; hi];
                    full[lo..].copy_from_slice(&part);
                    bitmap::set_range(&mut full, first, nsec);
                    part.copy_from_slice(&full[lo..]);
                    if part != before {
                        self.file
                            .write_all_at(&part, base + lo as u64)
                            .map_err(werr)?;
                    }
                }
            }
            done += n;
        }
        Ok(())
    }

    pub fn flush(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| io(&self.path, "fdatasync", e))
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
