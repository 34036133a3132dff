//! The extension calls: how capabilities added after ABI 1.0 cross the boundary.
//!
//! The 1.0 interface ([`FfiDisk`](crate::ffi::FfiDisk), [`PluginMod`](crate::ffi::PluginMod))
//! is frozen. Each carries one extension call, `extension(id, input, output)`, and everything
//! a later minor version adds travels through it under a new id ([`crate::ffi::ext`]): a fact
//! the host asks a disk for, or a new operation. A plugin built before the id existed answers
//! "unsupported", and the host falls back to what 1.0 did; a host that does not know an id
//! never asks for it. Both sides of these calls live in this crate, so plugin authors see
//! only [`Disk`](crate::Disk) and [`DiskInfo`](crate::DiskInfo).

use crate::disk::{Disk, DiskInfo, Extent};
use crate::error::{Error, Result};
use crate::ffi::{ext, FfiDiskBox};
use abi_stable::std_types::{RSlice, RSliceMut};

/// Writes `value` into as much of `output` as the asker made room for; returns the bytes
/// written. An asker with a shorter structure gets its prefix: encodings only grow.
fn answer(output: &mut [u8], value: &[u8]) -> u32 {
    let n = output.len().min(value.len());
    output[..n].copy_from_slice(&value[..n]);
    n as u32
}

/// Answers the disk extension `id` for `disk` (plugin side).
pub(crate) fn serve_disk<D: Disk>(
    disk: &D,
    id: u32,
    input: &[u8],
    output: &mut [u8],
) -> Result<u32> {
    match id {
        ext::DISCARD_LIMITS => Ok(answer(output, &disk.info().discard_alignment.to_ne_bytes())),
        ext::BLOCK_STATUS => serve_extents(disk, input, output),
        ext::COMPLETIONS => serve_completions(disk, input, output),
        _ => Err(unknown(id)),
    }
}

/// [`ext::COMPLETIONS`], plugin side.
fn serve_completions<D: Disk>(disk: &D, input: &[u8], output: &mut [u8]) -> Result<u32> {
    match input.first().copied() {
        Some(ext::COMPLETIONS_ATTACH) => Ok(match disk.attach_completions() {
            Some(fd) if output.len() >= 4 => answer(output, &fd.to_ne_bytes()),
            Some(_) => {
                // An asker with no room for the answer cannot watch: undo.
                disk.detach_completions();
                0
            }
            None => 0,
        }),
        Some(ext::COMPLETIONS_TAKE) => {
            disk.take_completions();
            Ok(0)
        }
        Some(ext::COMPLETIONS_DETACH) => {
            disk.detach_completions();
            Ok(0)
        }
        other => Err(Error::new(
            crate::ErrorKind::Other,
            format!("completions: unknown operation {other:?}"),
        )),
    }
}

/// Host side of [`ext::COMPLETIONS`]: the operation's answer, or `None` when the disk does
/// not know the extension (built before 1.3) or declined.
pub(crate) fn ask_completions(disk: &FfiDiskBox, op: u8) -> Option<i32> {
    let mut out = [0u8; 4];
    let got = disk.extension(
        ext::COMPLETIONS,
        RSlice::from_slice(&[op]),
        RSliceMut::from_mut_slice(&mut out),
    );
    matches!(got.into_result(), Ok(4)).then(|| i32::from_ne_bytes(out))
}

/// [`ext::BLOCK_STATUS`], plugin side: checks the input, asks the disk, encodes as many
/// extents as the output holds (at least one, or an error).
fn serve_extents<D: Disk>(disk: &D, input: &[u8], output: &mut [u8]) -> Result<u32> {
    let (Some(offset), Some(len)) = (input.get(0..8), input.get(8..16)) else {
        return Err(Error::new(
            crate::ErrorKind::Other,
            "block status: short input",
        ));
    };
    let offset = u64::from_ne_bytes(offset.try_into().expect("8 bytes"));
    let len = u64::from_ne_bytes(len.try_into().expect("8 bytes"));
    let room = output.len() / ext::EXTENT_RECORD;
    if room == 0 || len == 0 {
        return Err(Error::new(
            crate::ErrorKind::Other,
            "block status: no room or empty range",
        ));
    }
    let extents = disk.extents(offset, len)?;
    let mut written = 0;
    let mut covered = 0u64;
    for e in extents.iter().take(room) {
        if e.len == 0 || covered + e.len > len {
            break;
        }
        covered += e.len;
        let flags =
            if e.hole { ext::EXTENT_HOLE } else { 0 } | if e.zero { ext::EXTENT_ZERO } else { 0 };
        let rec = &mut output[written..written + ext::EXTENT_RECORD];
        rec[0..8].copy_from_slice(&e.len.to_ne_bytes());
        rec[8..12].copy_from_slice(&flags.to_ne_bytes());
        rec[12..16].copy_from_slice(&0u32.to_ne_bytes());
        written += ext::EXTENT_RECORD;
    }
    if written == 0 {
        return Err(Error::new(
            crate::ErrorKind::Other,
            "block status: the disk answered no extent inside the range",
        ));
    }
    Ok(written as u32)
}

/// Asks `disk` for its block status over `[offset, offset + len)` (host side, or a filter
/// asking its base). A disk built before 1.2, or one that does not report, answers
/// "unsupported".
pub(crate) fn ask_extents(disk: &FfiDiskBox, offset: u64, len: u64) -> Result<Vec<Extent>> {
    let mut input = [0u8; 16];
    input[0..8].copy_from_slice(&offset.to_ne_bytes());
    input[8..16].copy_from_slice(&len.to_ne_bytes());
    let mut out = vec![0u8; 1024 * ext::EXTENT_RECORD];
    let got = disk
        .extension(
            ext::BLOCK_STATUS,
            RSlice::from_slice(&input),
            RSliceMut::from_mut_slice(&mut out),
        )
        .into_result()
        .map_err(Error::from)? as usize;
    let got = got.min(out.len()) / ext::EXTENT_RECORD * ext::EXTENT_RECORD;
    let mut v = Vec::with_capacity(got / ext::EXTENT_RECORD);
    for rec in out[..got].chunks_exact(ext::EXTENT_RECORD) {
        let len = u64::from_ne_bytes(rec[0..8].try_into().expect("8 bytes"));
        let flags = u32::from_ne_bytes(rec[8..12].try_into().expect("4 bytes"));
        v.push(Extent {
            len,
            hole: flags & ext::EXTENT_HOLE != 0,
            zero: flags & ext::EXTENT_ZERO != 0,
        });
    }
    Ok(v)
}

/// Answers the plugin-wide extension `id` (plugin side). None is defined yet.
pub(crate) fn serve_module(id: u32, input: &[u8], output: &mut [u8]) -> Result<u32> {
    let _ = (input, output);
    Err(unknown(id))
}

fn unknown(id: u32) -> Error {
    Error::unsupported(&format!("extension {id:#x}"))
}

/// Completes `info` (the 1.0 fields, from `FfiDisk::info`) with what the disk answers to the
/// extensions this crate knows (host side). A disk that does not know one (built before it,
/// or a filter's disk that does not forward it) keeps that field's default.
pub(crate) fn ask_disk(disk: &FfiDiskBox, mut info: DiskInfo) -> DiskInfo {
    if info.can_discard {
        let mut out = [0u8; 4];
        let got = disk.extension(
            ext::DISCARD_LIMITS,
            RSlice::from_slice(&[]),
            RSliceMut::from_mut_slice(&mut out),
        );
        if matches!(got.into_result(), Ok(4)) {
            info.discard_alignment = u32::from_ne_bytes(out);
        }
    }
    info
}
