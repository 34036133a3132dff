//! The extension calls: how capabilities added after ABI 1.0 cross the boundary.
//!
//! The 1.0 interface ([`FfiDisk`](crate::ffi::FfiDisk), [`PluginMod`](crate::ffi::PluginMod))
//! is frozen. Each carries one extension call, `extension(id, input, output)`, and everything
//! a later minor version adds travels through it under a new id ([`crate::ffi::ext`]): a fact
//! the host asks a disk for, or a new operation. A plugin built before the id existed answers
//! "unsupported", and the host falls back to what 1.0 did; a host that does not know an id
//! never asks for it. Both sides of these calls live in this crate, so plugin authors see
//! only [`Disk`](crate::Disk) and [`DiskInfo`](crate::DiskInfo).

use crate::disk::{Disk, DiskInfo};
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
    let _ = input;
    match id {
        ext::DISCARD_LIMITS => Ok(answer(output, &disk.info().discard_alignment.to_ne_bytes())),
        _ => Err(unknown(id)),
    }
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
