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
use xen_disk_plugin_api::{Error, Extent, Result};

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
    /// Serialises read-modify-write of bitmap bytes by in-place writes that share the image.
    pub bitmap_lock: std::sync::Mutex<()>,
}

/// What a write stores.
#[derive(Debug, Clone, Copy)]
pub enum Src<'a> {
    /// These bytes.
    Data(&'a [u8]),
    /// Zeroes (write-zeroes): no buffer, and a hole in the file where possible.
    Zeroes,
}

impl<'a> Src<'a> {
    fn slice(self, from: u64, len: u64) -> Src<'a> {
        match self {
            Src::Data(d) => Src::Data(&d[from as usize..(from + len) as usize]),
            Src::Zeroes => Src::Zeroes,
        }
    }
}

/// One block's part of a request: `done` bytes into it, at disk offset `pos`, in block `blk`
/// at `in_blk` bytes from the block's start, `n` bytes long.
#[derive(Debug, Clone, Copy)]
struct Piece {
    done: u64,
    pos: u64,
    blk: usize,
    in_blk: u64,
    n: u64,
}

/// `[off, off + len)` cut at `bs`-byte block boundaries.
fn pieces(off: u64, len: u64, bs: u64) -> impl Iterator<Item = Piece> {
    let mut done = 0u64;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let pos = off + done;
        let in_blk = pos % bs;
        let n = (bs - in_blk).min(len - done);
        let p = Piece {
            done,
            pos,
            blk: (pos / bs) as usize,
            in_blk,
            n,
        };
        done += n;
        Some(p)
    })
}

/// Frees `[at, at + len)` of `file` and makes it read as zeroes, keeping the file's size.
/// Partial file-system blocks at either end are zeroed by the kernel.
fn punch_hole(file: &File, at: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(at), Ok(len)) = (libc::off_t::try_from(at), libc::off_t::try_from(len)) else {
        return Err(std::io::ErrorKind::InvalidInput.into());
    };
    // SAFETY: fallocate on a descriptor we own, with plain integer arguments; no memory is
    // passed to the kernel.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            at,
            len,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
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
            .map_err(|e| {
                let e = io(path, "open", e);
                if writable {
                    e.read_only_hint("readonly=true")
                } else {
                    e
                }
            })?;
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
                bitmap_lock: std::sync::Mutex::new(()),
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

    /// Block status of `[off, off + len)` (ABI 1.2; bounds-checked by the caller). A fixed
    /// image is data. In a dynamic one an allocated block is data and an unallocated one a
    /// hole that reads as zeroes, as qemu maps them; in a differencing one an allocated
    /// block's sectors are data where its bitmap has them and the parent's status
    /// elsewhere, and an unallocated block is the parent's status.
    pub fn extents(&self, off: u64, len: u64) -> Result<Vec<Extent>> {
        let Some(sp) = &self.sparse else {
            return Ok(vec![Extent::data(len)]);
        };
        let bs = u64::from(sp.header.block_size);
        let mut out: Vec<Extent> = Vec::new();
        fn push(out: &mut Vec<Extent>, e: Extent) {
            match out.last_mut() {
                Some(l) if l.hole == e.hole && l.zero == e.zero => l.len += e.len,
                _ => out.push(e),
            }
        }
        for p in pieces(off, len, bs) {
            let e = sp.bat.get(p.blk).copied().unwrap_or(UNALLOCATED);
            match (&sp.parent, e == UNALLOCATED) {
                (None, true) => push(&mut out, Extent::hole(p.n)),
                (None, false) => push(&mut out, Extent::data(p.n)),
                (Some(parent), true) => parent
                    .extents(p.pos, p.n)?
                    .into_iter()
                    .for_each(|e| push(&mut out, e)),
                (Some(parent), false) => {
                    let base = u64::from(e) * 512;
                    let mut bm = vec![0u8; sp.bitmap_size as usize];
                    read_at(&self.file, &self.path, &mut bm, base, "block bitmap")?;
                    let first = (p.in_blk / 512) as usize;
                    let mut s = 0u64;
                    while s < p.n {
                        let here = bitmap::is_set(&bm, first + (s / 512) as usize);
                        let mut t = s + 512;
                        while t < p.n && bitmap::is_set(&bm, first + (t / 512) as usize) == here {
                            t += 512;
                        }
                        let t = t.min(p.n);
                        if here {
                            push(&mut out, Extent::data(t - s));
                        } else {
                            for e in parent.extents(p.pos + s, t - s)? {
                                push(&mut out, e);
                            }
                        }
                        s = t;
                    }
                }
            }
        }
        Ok(out)
    }

    /// Whether every block of `[off, off + len)` is already allocated in this file, so a
    /// write there changes no BAT entry and may run beside other I/O ([`Image::write_in_place`]).
    pub fn is_allocated(&self, off: u64, len: u64) -> bool {
        let Some(sp) = &self.sparse else {
            return true;
        };
        if len == 0 {
            return true;
        }
        let bs = u64::from(sp.header.block_size);
        let (first, last) = (off / bs, (off + len - 1) / bs);
        (first..=last).all(|b| sp.bat.get(b as usize).is_some_and(|&e| e != UNALLOCATED))
    }

    /// Writes `buf` at `off` (sector-aligned, bounds-checked), allocating blocks here.
    pub fn write(&mut self, off: u64, buf: &[u8]) -> Result<()> {
        self.store(off, buf.len() as u64, Src::Data(buf))
    }

    /// Stores `src` over `[off, off + len)`, allocating blocks in this file where needed.
    pub fn store(&mut self, off: u64, len: u64, src: Src<'_>) -> Result<()> {
        let Some(sp) = &self.sparse else {
            return self.write_in_place(off, len, src);
        };
        let has_parent = sp.parent.is_some();
        for p in pieces(off, len, u64::from(sp.header.block_size)) {
            let piece = src.slice(p.done, p.n);
            if self.is_allocated(p.pos, p.n) {
                self.write_in_place(p.pos, p.n, piece)?;
            } else if has_parent || !matches!(piece, Src::Zeroes) {
                // An unallocated block of a disk without parent already reads as zeroes.
                self.allocate(p.pos, p.n, piece)?;
            }
        }
        Ok(())
    }

    /// Writes into blocks that are all allocated ([`Image::is_allocated`]); needs only `&self`,
    /// so the plugin runs such writes under a shared lock. A differencing disk's bitmap bytes
    /// are read, changed and written under the sparse part's bitmap lock.
    pub fn write_in_place(&self, off: u64, len: u64, src: Src<'_>) -> Result<()> {
        let Some(sp) = &self.sparse else {
            return self.put(off, len, src);
        };
        for p in pieces(off, len, u64::from(sp.header.block_size)) {
            let entry = sp.bat.get(p.blk).copied().unwrap_or(UNALLOCATED);
            if entry == UNALLOCATED {
                return Err(Error::msg(format!(
                    "{}: block {} is not allocated for an in-place write",
                    self.path.display(),
                    p.blk
                )));
            }
            let base = u64::from(entry) * 512;
            self.put(
                base + sp.bitmap_size + p.in_blk,
                p.n,
                src.slice(p.done, p.n),
            )?;
            if sp.parent.is_some() {
                let (first, nsec) = ((p.in_blk / 512) as usize, p.n.div_ceil(512) as usize);
                self.mark_present(sp, base, first, nsec)?;
            }
        }
        Ok(())
    }

    /// Sets bitmap bits `[first, first + nsec)` of the block at `base`, writing only the bytes
    /// that change.
    fn mark_present(&self, sp: &Sparse, base: u64, first: usize, nsec: usize) -> Result<()> {
        let lo = first / 8;
        let hi = (first + nsec).div_ceil(8);
        let _guard = sp.bitmap_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut part = vec![0u8; hi - lo];
        read_at(
            &self.file,
            &self.path,
            &mut part,
            base + lo as u64,
            "block bitmap",
        )?;
        let mut full = vec![0u8; hi];
        full[lo..].copy_from_slice(&part);
        bitmap::set_range(&mut full, first, nsec);
        if full[lo..] != part[..] {
            self.file
                .write_all_at(&full[lo..], base + lo as u64)
                .map_err(|e| io(&self.path, "write block bitmap", e))?;
        }
        Ok(())
    }

    /// Allocates the block holding `[pos, pos + n)` (one block's piece) at the end of the file
    /// and stores the piece there, in the crash-safe order of the module doc.
    fn allocate(&mut self, pos: u64, n: u64, src: Src<'_>) -> Result<()> {
        let path = self.path.clone();
        let werr = |e| io(&path, "write", e);
        let sp = self.sparse.as_ref().expect("sparse image");
        let bs = u64::from(sp.header.block_size);
        let blk = (pos / bs) as usize;
        let in_blk = pos % bs;
        let base = sp.next_free;
        let sector = base / 512;
        if sector >= u64::from(u32::MAX) {
            return Err(Error::msg(format!(
                "{}: file too large for BAT offsets",
                path.display()
            )));
        }
        // 1. data (the rest of the block reads as zero: the file is extended sparse, and
        // zeroes need no write at all).
        let block_end = base + sp.bitmap_size + bs;
        if let Src::Data(d) = src {
            self.file
                .write_all_at(d, base + sp.bitmap_size + in_blk)
                .map_err(werr)?;
        }
        if self.file.metadata().map_err(werr)?.len() < block_end {
            self.file.set_len(block_end).map_err(werr)?;
        }
        // 2. bitmap: all present for a dynamic disk; only the written sectors for a
        // differencing one (the rest fall through to the parent).
        let mut bm = vec![0u8; sp.bitmap_size as usize];
        if sp.parent.is_none() {
            bitmap::set_range(&mut bm, 0, (bs / 512) as usize);
        } else {
            bitmap::set_range(&mut bm, (in_blk / 512) as usize, n.div_ceil(512) as usize);
        }
        self.file.write_all_at(&bm, base).map_err(werr)?;
        // 3. BAT entry.
        let at = sp.header.table_offset + blk as u64 * 4;
        self.file
            .write_all_at(&(sector as u32).to_be_bytes(), at)
            .map_err(werr)?;
        // 4. footer at the new end.
        self.file
            .write_all_at(&self.footer.raw, block_end)
            .map_err(werr)?;
        // Drop any tail a crashed allocation left past the new footer.
        if self.file.metadata().map_err(werr)?.len() > block_end + 512 {
            self.file.set_len(block_end + 512).map_err(werr)?;
        }
        let sp = self.sparse.as_mut().expect("sparse image");
        sp.bat[blk] = sector as u32;
        sp.next_free = block_end;
        Ok(())
    }

    /// Tells the image `[off, off + len)` is unused: the data of allocated blocks in the range
    /// is punched out of the file (it then reads as zeroes). No BAT entry or bitmap changes,
    /// so a crash cannot corrupt metadata; sectors a differencing disk never wrote still read
    /// from its parent, and unallocated blocks are left alone.
    pub fn discard(&self, off: u64, len: u64) -> Result<()> {
        let Some(sp) = &self.sparse else {
            return self.put(off, len, Src::Zeroes);
        };
        for p in pieces(off, len, u64::from(sp.header.block_size)) {
            let entry = sp.bat.get(p.blk).copied().unwrap_or(UNALLOCATED);
            if entry != UNALLOCATED {
                let data = u64::from(entry) * 512 + sp.bitmap_size + p.in_blk;
                self.put(data, p.n, Src::Zeroes)?;
            }
        }
        Ok(())
    }

    /// Stores `src` at file offset `at`: zeroes by punching a hole (the file system frees the
    /// space and the range reads as zero), or by writing zeroes where holes are unsupported.
    fn put(&self, at: u64, len: u64, src: Src<'_>) -> Result<()> {
        let werr = |e| io(&self.path, "write", e);
        match src {
            Src::Data(d) => self.file.write_all_at(d, at).map_err(werr),
            Src::Zeroes => {
                if punch_hole(&self.file, at, len).is_ok() {
                    return Ok(());
                }
                let zero = vec![0u8; len.min(1 << 20) as usize];
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(zero.len() as u64) as usize;
                    self.file
                        .write_all_at(&zero[..n], at + done)
                        .map_err(werr)?;
                    done += n as u64;
                }
                Ok(())
            }
        }
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
