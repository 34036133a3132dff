//! Creating new images (config `create = ...`): fixed, dynamic, and differencing over a
//! parent. Layout of a sparse image: footer copy, header at 512, BAT at 1536, parent
//! locators (differencing), then blocks, then the footer.

use crate::footer::{chs_size, new_uuid, DiskType, Footer, MAX_SIZE};
use crate::header::{Header, Locator, HEADER_SIZE, PLAT_W2KU, PLAT_W2RU};
use crate::image::Image;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use xen_disk_plugin_api::{Error, Result};

/// What to create.
pub enum Kind<'a> {
    Fixed,
    Dynamic,
    Differencing { parent: &'a Path },
}

fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

/// Creates `path` (which must not exist). `size` is rounded up to the CHS geometry.
///
/// The image is built under a temporary name beside `path`, synced, then linked into place
/// (which fails if `path` appeared meanwhile): a crash never leaves a half-made image at
/// `path`, and an existing file is never replaced.
pub fn create(path: &Path, kind: Kind<'_>, size: u64, block_size: u32) -> Result<()> {
    let werr = |e: std::io::Error| Error::from(e).context(format!("{}: create", path.display()));
    if path.exists() {
        return Err(werr(std::io::ErrorKind::AlreadyExists.into()));
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".creating-{}", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    let built = build(path, &tmp, kind, size, block_size);
    let linked = built.and_then(|()| std::fs::hard_link(&tmp, path).map_err(werr));
    let _ = std::fs::remove_file(&tmp);
    linked?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // The new name is durable too.
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(werr)?;
    }
    Ok(())
}

/// Writes the new image into `tmp`; `path` is where it will live (locators are relative to it).
fn build(path: &Path, tmp: &Path, kind: Kind<'_>, size: u64, block_size: u32) -> Result<()> {
    let werr = |e: std::io::Error| Error::from(e).context(format!("{}: create", path.display()));
    if !block_size.is_power_of_two() || !(4096..=(256 << 20)).contains(&block_size) {
        return Err(Error::config(
            "block-size",
            format!("{block_size} is not a power of two from 4 KiB to 256 MiB"),
        ));
    }
    let (size, parent) = match &kind {
        Kind::Differencing { parent } => {
            let p = Image::open(parent, false).map_err(|e| e.context("parent"))?;
            (p.size(), Some((p.footer.unique_id, p.footer.timestamp)))
        }
        _ => {
            if size == 0 || size > MAX_SIZE {
                return Err(Error::config(
                    "size",
                    format!("{size} is not from 512 bytes to 2040 GiB"),
                ));
            }
            (chs_size(size).min(MAX_SIZE), None)
        }
    };
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tmp)
        .map_err(werr)?;
    let uuid = new_uuid();
    if let Kind::Fixed = kind {
        let f = Footer::new(DiskType::Fixed, size, u64::MAX, uuid);
        file.set_len(size).map_err(werr)?;
        file.write_all_at(&f.raw, size).map_err(werr)?;
        return file.sync_all().map_err(werr);
    }
    let entries = size.div_ceil(u64::from(block_size)) as u32;
    let table_offset = 512 + HEADER_SIZE as u64;
    let mut end = table_offset + (u64::from(entries) * 4).next_multiple_of(512);
    let mut header = Header {
        table_offset,
        max_table_entries: entries,
        block_size,
        parent_uuid: [0; 16],
        parent_timestamp: 0,
        parent_name: String::new(),
        locators: Vec::new(),
    };
    let mut locator_data = Vec::new();
    let disk_type =
        if let (Kind::Differencing { parent: ppath }, Some((puuid, pts))) = (&kind, parent) {
            header.parent_uuid = puuid;
            header.parent_timestamp = pts;
            let abs = ppath.canonicalize().map_err(werr)?;
            let name = abs
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            // Relative when the parent sits beside the child; otherwise absolute only.
            let child_dir = path.parent().and_then(|d| {
                if d.as_os_str().is_empty() {
                    Path::new(".").canonicalize().ok()
                } else {
                    d.canonicalize().ok()
                }
            });
            let mut locs = Vec::new();
            if child_dir.as_deref() == abs.parent() {
                locs.push((PLAT_W2RU, utf16le(&format!(".\\{name}"))));
            }
            locs.push((PLAT_W2KU, utf16le(&abs.to_string_lossy())));
            header.parent_name = if child_dir.as_deref() == abs.parent() {
                name
            } else {
                abs.to_string_lossy().into_owned()
            };
            for (code, data) in locs {
                let space = (data.len() as u64).next_multiple_of(512);
                header.locators.push(Locator {
                    code,
                    space: space as u32,
                    len: data.len() as u32,
                    offset: end,
                });
                locator_data.push((end, data));
                end += space;
            }
            DiskType::Differencing
        } else {
            DiskType::Dynamic
        };
    let footer = Footer::new(disk_type, size, 512, uuid);
    file.write_all_at(&footer.raw, 0).map_err(werr)?;
    file.write_all_at(&header.encode(), 512).map_err(werr)?;
    file.write_all_at(&vec![0xff; (u64::from(entries) * 4) as usize], table_offset)
        .map_err(werr)?;
    for (at, data) in locator_data {
        file.write_all_at(&data, at).map_err(werr)?;
    }
    file.set_len(end).map_err(werr)?;
    file.write_all_at(&footer.raw, end).map_err(werr)?;
    file.sync_all().map_err(werr)
}
