//! The copy-on-write disk: reads merge overlay and base, writes go to the overlay only.

use crate::overlay::Overlay;
use std::sync::Mutex;
use xen_disk_plugin_api::*;

/// Copy-ups of different granules run in parallel; the same granule's are serialized by
/// its stripe, so two partial writes can never each copy up and overwrite the other.
const STRIPES: usize = 64;

/// The base, seen only through `info` and `read`: cow has no path that writes it.
pub struct ReadOnlyBase(ForeignDisk);

impl ReadOnlyBase {
    pub fn new(base: ForeignDisk) -> Self {
        ReadOnlyBase(base)
    }
    pub fn info(&self) -> DiskInfo {
        self.0.info()
    }
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        with_read_bufs(&mut [buf], |b| self.0.read(offset, b))
    }
    fn read_bufs(&self, offset: u64, bufs: &mut ReadBufs<'_>) -> Result<()> {
        self.0.read(offset, bufs)
    }
    /// The base's block status; a base that reports none is data.
    fn extents(&self, offset: u64, len: u64) -> Vec<Extent> {
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < offset + len {
            let got = self.0.extents(pos, offset + len - pos).unwrap_or_default();
            let n: u64 = got.iter().map(|e| e.len).sum();
            if n == 0 || pos + n > offset + len {
                out.push(Extent::data(offset + len - pos));
                break;
            }
            out.extend(got);
            pos += n;
        }
        out
    }
}

pub struct CowDisk {
    base: ReadOnlyBase,
    overlay: Overlay,
    info: DiskInfo,
    granularity: u64,
    stripes: [Mutex<()>; STRIPES],
}

/// Where a write's bytes come from.
enum Source<'a, 'b> {
    Bufs(&'a WriteBufs<'b>),
    Zeroes,
}

impl Source<'_, '_> {
    /// Fills `dst` with the source's bytes from request offset `at`.
    fn fill(&self, at: usize, dst: &mut [u8]) {
        match self {
            Source::Bufs(b) => b.copy_out_at(at, dst),
            Source::Zeroes => dst.fill(0),
        }
    }
}

impl CowDisk {
    pub fn new(base: ReadOnlyBase, overlay: Overlay) -> CowDisk {
        let b = base.info();
        let granularity = overlay.header().granularity;
        let info = DiskInfo::new(b.size)
            .sector_size(b.logical_sector_size)
            .physical_sector_size(b.physical_sector_size)
            .flush(overlay.persistent())
            .discard(true)
            .write_zeroes(true)
            .discard_granularity(granularity as u32); // ≤ 1 GiB, checked at open
        CowDisk {
            base,
            overlay,
            info,
            granularity,
            stripes: std::array::from_fn(|_| Mutex::new(())),
        }
    }

    /// The end of `[offset, offset + len)`, refused if outside the disk: the host checks
    /// first, this keeps a direct caller (a filter above, a test) from indexing past the map.
    fn end_of(&self, offset: u64, len: u64) -> Result<u64> {
        match offset.checked_add(len) {
            Some(end) if end <= self.info.size => Ok(end),
            _ => Err(Error::new(
                ErrorKind::OutOfRange,
                format!("{offset}+{len} is outside the {}-byte disk", self.info.size),
            )),
        }
    }

    /// The run starting at `pos` (≤ `end`) of granules that are all in the overlay, or all
    /// not: (in overlay?, run end).
    fn run(&self, pos: u64, end: u64) -> (bool, u64) {
        let g = self.granularity;
        let mapped = self.overlay.bitmap().get(pos / g);
        let mut next = (pos / g + 1) * g;
        while next < end && self.overlay.bitmap().get(next / g) == mapped {
            next += g;
        }
        (mapped, next.min(end))
    }

    fn write_from(&self, offset: u64, len: u64, src: &Source<'_, '_>) -> Result<()> {
        let end = self.end_of(offset, len)?;
        let mut pos = offset;
        while pos < end {
            let (mapped, run_end) = self.run(pos, end);
            if mapped {
                let mut tmp = vec![0u8; (run_end - pos) as usize];
                src.fill((pos - offset) as usize, &mut tmp);
                self.overlay.write_at(pos, &tmp)?;
                pos = run_end;
            } else {
                let g_end = ((pos / self.granularity + 1) * self.granularity).min(end);
                self.copy_up(pos, g_end, offset, src)?;
                pos = g_end;
            }
        }
        Ok(())
    }

    /// Puts the granule holding `[pos, piece_end)` into the overlay with those bytes from
    /// `src` and the rest from the base, then sets its bit.
    fn copy_up(&self, pos: u64, piece_end: u64, offset: u64, src: &Source<'_, '_>) -> Result<()> {
        let g = self.granularity;
        let index = pos / g;
        let _stripe = self.stripes[index as usize % STRIPES]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let at = (pos - offset) as usize;
        if self.overlay.bitmap().get(index) {
            // Another writer copied it up while we waited.
            let mut tmp = vec![0u8; (piece_end - pos) as usize];
            src.fill(at, &mut tmp);
            return self.overlay.write_at(pos, &tmp);
        }
        let start = index * g;
        let mut granule = vec![0u8; ((start + g).min(self.info.size) - start) as usize];
        let (lo, hi) = ((pos - start) as usize, (piece_end - start) as usize);
        if lo > 0 || hi < granule.len() {
            self.base.read(start, &mut granule)?;
        }
        src.fill(at, &mut granule[lo..hi]);
        self.overlay.write_at(start, &granule)?;
        self.overlay.mark(index)
    }
}

impl Disk for CowDisk {
    fn info(&self) -> DiskInfo {
        self.info
    }

    fn read(&self, offset: u64, bufs: &mut ReadBufs<'_>) -> Result<()> {
        let end = self.end_of(offset, bufs.len() as u64)?;
        if end == offset {
            return Ok(());
        }
        let (mapped, run_end) = self.run(offset, end);
        if run_end == end && !mapped {
            // The common case over a gold image: straight from the base into the guest's pages.
            return self.base.read_bufs(offset, bufs);
        }
        let mut pos = offset;
        let mut tmp = Vec::new();
        while pos < end {
            let (mapped, run_end) = self.run(pos, end);
            tmp.resize((run_end - pos) as usize, 0);
            if mapped {
                self.overlay.read_at(pos, &mut tmp)?;
            } else {
                self.base.read(pos, &mut tmp)?;
            }
            bufs.copy_in_at((pos - offset) as usize, &tmp);
            pos = run_end;
        }
        Ok(())
    }

    fn write(&self, offset: u64, bufs: &WriteBufs<'_>) -> Result<()> {
        self.write_from(offset, bufs.len() as u64, &Source::Bufs(bufs))
    }

    /// Granules in the overlay are data (what the guest wrote, zeroes included); the rest
    /// is the base's, so a cow over a sparse or qcow2 image keeps its holes.
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let end = self.end_of(offset, len)?;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        // A bounded answer; the host asks again from where it stops.
        while pos < end && out.len() < 1024 {
            let (mapped, run_end) = self.run(pos, end);
            let runs = if mapped {
                vec![Extent::data(run_end - pos)]
            } else {
                self.base.extents(pos, run_end - pos)
            };
            for e in runs {
                match out.last_mut() {
                    Some(l) if l.hole == e.hole && l.zero == e.zero => l.len += e.len,
                    _ => out.push(e),
                }
            }
            pos = run_end;
        }
        Ok(out)
    }

    fn flush(&self) -> Result<()> {
        self.overlay.flush()
    }

    /// Discarded ranges read as zeroes, like write-zeroes: the base below still holds data,
    /// so "forgetting" a range can only mean shadowing it.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        // Bounded chunks keep the temporary buffers small for a large range.
        const CHUNK: u64 = 16 << 20;
        let end = self.end_of(offset, len)?;
        let mut pos = offset;
        while pos < end {
            let n = CHUNK.min(end - pos);
            self.write_from(pos, n, &Source::Zeroes)?;
            pos += n;
        }
        Ok(())
    }
}

impl Drop for CowDisk {
    /// Closing persists the bitmap, so a clean detach keeps every write even if the guest
    /// never flushed. There is no one left to tell about an error.
    fn drop(&mut self) {
        let _ = self.overlay.flush();
    }
}
