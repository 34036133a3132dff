//! The stable ABI: what actually crosses the `.so` boundary (abi_stable types only).
//!
//! Plugin authors never touch this module: [`export_plugin!`](crate::export_plugin) builds
//! the root module from a [`Plugin`](crate::Plugin), and the host wraps what it loads in
//! [`ForeignDisk`](crate::ForeignDisk). It is public so the host (and filter plugins) can
//! name the types.
//!
//! ```text
//!  lib<name>.so exports
//!   ├ xen_disk_plugin_abi_version() -> u32        checked first: major << 16 | minor
//!   └ abi_stable LibHeader ─▶ PluginMod (frozen at 1.0; layout checked by abi_stable)
//!        ├ abi_version: u32
//!        ├ describe() -> FfiDescriptor             kind, name, version, description, keys
//!        ├ open(config TOML text) -> FfiDisk trait object | FfiError
//!        ├ open_over(config, base FfiDisk) -> FfiDisk | FfiError      (filters only)
//!        ├ read_only_base() -> bool
//!        └ extension(id, input, output)            what minor versions add (ext)
//!  FfiDisk (frozen at 1.0): info · read · write · flush · discard · write_zeroes · submit
//!                           · extension(id, input, output)
//! ```
//!
//! The configuration crosses as TOML text, so host and plugin need not share a `toml`
//! version. Nothing here changes after 1.0 (see [the crate docs](crate#compatibility)): a
//! later capability is an extension id, answered "unsupported" by plugins built before it.

use crate::config::KeyType;
use crate::error::ErrorKind;
use crate::{buffers::RawBuf, disk::ThreadModel};
use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    sabi_trait,
    sabi_types::VersionStrings,
    std_types::{RBox, ROption, RResult, RSlice, RSliceMut, RStr, RString, RVec},
    StableAbi,
};

/// An error crossing the boundary.
#[repr(C)]
#[derive(Debug, Clone, StableAbi)]
pub struct FfiError {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// errno, 0 if none.
    pub errno: i32,
    /// One-line message.
    pub message: RString,
}

/// A declared configuration key crossing the boundary.
#[repr(C)]
#[derive(Debug, Clone, StableAbi)]
pub struct FfiConfigKey {
    /// Key name.
    pub name: RStr<'static>,
    /// Value type.
    pub ty: KeyType,
    /// Default as typed by a user.
    pub default: ROption<RStr<'static>>,
    /// Must be given.
    pub required: bool,
    /// One line of help.
    pub help: RStr<'static>,
}

/// Whether a plugin opens a disk from configuration alone, or over another disk.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, StableAbi)]
pub enum PluginKind {
    /// Opens a disk from its configuration (`open`).
    Disk = 0,
    /// Opens a disk over a base disk the host opened first (`open_over`).
    Filter = 1,
}

/// What `describe` returns.
#[repr(C)]
#[derive(Debug, Clone, StableAbi)]
pub struct FfiDescriptor {
    /// Disk or filter.
    pub kind: PluginKind,
    /// Short name.
    pub name: RStr<'static>,
    /// Plugin version.
    pub version: RStr<'static>,
    /// One-line description.
    pub description: RStr<'static>,
    /// Declared configuration keys.
    pub config_keys: RVec<FfiConfigKey>,
}

/// Write flag: the write must be durable on return.
pub const WRITE_FUA: u32 = 1;

/// How a plugin completes a [`Submission`](crate::Submission): `complete(ctx, result)`,
/// exactly once, from any thread.
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiCompletion {
    /// The host's context for this request.
    pub ctx: *mut (),
    /// Called once with the request's result.
    pub complete: extern "C" fn(ctx: *mut (), result: RResult<(), FfiError>),
}

// SAFETY: a completion is called once, from whichever thread finishes the request; the host
// builds `ctx` for exactly that.
unsafe impl Send for FfiCompletion {}

/// What [`FfiDisk::info`] returns: the ABI 1.0 layout of [`DiskInfo`](crate::DiskInfo),
/// frozen. Whatever a later minor version adds to `DiskInfo` crosses through
/// [`FfiDisk::extension`] instead.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, StableAbi)]
pub struct FfiDiskInfo {
    /// Size in bytes.
    pub size: u64,
    /// Logical sector size.
    pub logical_sector_size: u32,
    /// Physical sector size.
    pub physical_sector_size: u32,
    /// Refuses writes.
    pub read_only: bool,
    /// How the host may call the disk.
    pub thread_model: ThreadModel,
    /// Has a volatile cache that flush empties.
    pub can_flush: bool,
    /// Native FUA writes.
    pub can_fua: bool,
    /// Native discard.
    pub can_discard: bool,
    /// Native write-zeroes.
    pub can_write_zeroes: bool,
    /// Discard granularity in bytes (0 = the physical sector size).
    pub discard_granularity: u32,
}

/// The open-disk interface as a stable trait object. Frozen at ABI 1.0: its methods, their
/// order and their types never change; new disk calls and new facts go through
/// [`extension`](FfiDisk::extension).
#[sabi_trait]
pub trait FfiDisk: Send + Sync {
    /// See [`Disk::info`](crate::Disk::info).
    fn info(&self) -> FfiDiskInfo;
    /// See [`Disk::read`](crate::Disk::read).
    fn read(&self, offset: u64, bufs: RSlice<'_, RawBuf>) -> RResult<(), FfiError>;
    /// See [`Disk::write`](crate::Disk::write); `flags` may hold [`WRITE_FUA`].
    fn write(&self, offset: u64, bufs: RSlice<'_, RawBuf>, flags: u32) -> RResult<(), FfiError>;
    /// See [`Disk::flush`](crate::Disk::flush).
    fn flush(&self) -> RResult<(), FfiError>;
    /// See [`Disk::discard`](crate::Disk::discard).
    fn discard(&self, offset: u64, len: u64) -> RResult<(), FfiError>;
    /// See [`Disk::write_zeroes`](crate::Disk::write_zeroes).
    fn write_zeroes(&self, offset: u64, len: u64) -> RResult<(), FfiError>;
    /// See [`Disk::submit`](crate::Disk::submit). The buffers stay valid until `done` is
    /// called.
    fn submit(
        &self,
        op: crate::submit::SubmitOp,
        offset: u64,
        bufs: RSlice<'_, RawBuf>,
        done: FfiCompletion,
    );
    /// The extension call: what a later minor version adds to a disk. `id` names the
    /// extension ([`ext`]); `input` holds its arguments and `output` receives its answer, each
    /// in the extension's own size-prefixed encoding. Returns the number of bytes written to
    /// `output`, or an [`ErrorKind::Unsupported`] error for an `id` the plugin does not know,
    /// which is what every plugin built before the extension existed answers.
    #[sabi(last_prefix_field)]
    fn extension(
        &self,
        id: u32,
        input: RSlice<'_, u8>,
        output: RSliceMut<'_, u8>,
    ) -> RResult<u32, FfiError>;
}

/// An owned open disk from a plugin (dropping it closes the disk inside the plugin).
pub type FfiDiskBox = FfiDisk_TO<'static, RBox<()>>;

/// The root module every plugin exports. Frozen at ABI 1.0, like [`FfiDisk`]: new
/// plugin-wide calls go through [`extension`](PluginMod::extension).
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
pub struct PluginMod {
    /// The plugin interface version the plugin was built against ([`crate::ABI_VERSION`]).
    pub abi_version: u32,
    /// Describes the plugin.
    pub describe: extern "C" fn() -> FfiDescriptor,
    /// Opens a disk from configuration TOML text (a filter answers with an error).
    pub open: extern "C" fn(config: RStr<'_>) -> RResult<FfiDiskBox, FfiError>,
    /// Opens a filter's disk over `base`; `None` for plain disk plugins.
    pub open_over:
        Option<extern "C" fn(config: RStr<'_>, base: FfiDiskBox) -> RResult<FfiDiskBox, FfiError>>,
    /// True for a filter that never writes its base and wants the host to open the base
    /// read-only ([`Filter::READ_ONLY_BASE`](crate::Filter::READ_ONLY_BASE)).
    pub read_only_base: extern "C" fn() -> bool,
    /// The plugin-wide extension call, as [`FfiDisk::extension`]: unknown ids answer
    /// [`ErrorKind::Unsupported`].
    #[sabi(last_prefix_field)]
    pub extension: extern "C" fn(
        id: u32,
        input: RSlice<'_, u8>,
        output: RSliceMut<'_, u8>,
    ) -> RResult<u32, FfiError>,
}

/// Extension ids: what [`FfiDisk::extension`] and [`PluginMod::extension`] may be asked,
/// each with the minor version that added it. An id, once published, keeps its meaning and
/// its encoding forever; an encoding may only grow at its end (the answer's length says how
/// much of it the plugin filled).
pub mod ext {
    /// The high 16 bits of an id are the minor version that added it, so a host can tell a
    /// plugin too old for an extension without asking.
    pub const fn id(minor: u16, n: u16) -> u32 {
        ((minor as u32) << 16) | n as u32
    }

    /// Since 1.1, asked of a disk: its discard limits beyond the 1.0 granularity. No input;
    /// the answer is a `u32` in native byte order, the discard alignment in bytes
    /// ([`DiskInfo::discard_alignment`](crate::DiskInfo::discard_alignment)).
    pub const DISCARD_LIMITS: u32 = id(1, 1);

    /// Since 1.2, asked of a disk: its block status ([`Disk::extents`](crate::Disk::extents)).
    /// Input: offset and length, two `u64` in native byte order. Answer: consecutive
    /// records of [`EXTENT_RECORD`] bytes from the offset, as many as fit in the output:
    /// length `u64`, flags `u32` ([`EXTENT_HOLE`], [`EXTENT_ZERO`]), a reserved `u32` (0);
    /// the answer's length is a whole number of records, at least one.
    pub const BLOCK_STATUS: u32 = id(2, 1);
    /// The size of one [`BLOCK_STATUS`] record.
    pub const EXTENT_RECORD: usize = 16;
    /// [`BLOCK_STATUS`] flag: a hole.
    pub const EXTENT_HOLE: u32 = 1 << 0;
    /// [`BLOCK_STATUS`] flag: reads as zeroes.
    pub const EXTENT_ZERO: u32 = 1 << 1;

    /// Since 1.3, asked of a disk: completions taken by the host
    /// ([`Disk::attach_completions`](crate::Disk::attach_completions)). Input: one byte, the
    /// operation ([`COMPLETIONS_ATTACH`], [`COMPLETIONS_TAKE`], [`COMPLETIONS_DETACH`]).
    /// Answer to attach: the descriptor, an `i32` in native byte order, or nothing (0 bytes)
    /// when the disk declines; to take and detach: nothing.
    pub const COMPLETIONS: u32 = id(3, 1);
    /// [`COMPLETIONS`] operation: attach; the answer is the descriptor to watch.
    pub const COMPLETIONS_ATTACH: u8 = 0;
    /// [`COMPLETIONS`] operation: take what is ready.
    pub const COMPLETIONS_TAKE: u8 = 1;
    /// [`COMPLETIONS`] operation: detach.
    pub const COMPLETIONS_DETACH: u8 = 2;
}

/// Converts the frozen layout to the SDK's [`DiskInfo`](crate::DiskInfo); fields added after
/// 1.0 start at their defaults.
impl From<FfiDiskInfo> for crate::DiskInfo {
    fn from(f: FfiDiskInfo) -> Self {
        crate::DiskInfo {
            size: f.size,
            logical_sector_size: f.logical_sector_size,
            physical_sector_size: f.physical_sector_size,
            read_only: f.read_only,
            thread_model: f.thread_model,
            can_flush: f.can_flush,
            can_fua: f.can_fua,
            can_discard: f.can_discard,
            can_write_zeroes: f.can_write_zeroes,
            discard_granularity: f.discard_granularity,
            ..crate::DiskInfo::new(f.size)
        }
    }
}

impl From<crate::DiskInfo> for FfiDiskInfo {
    fn from(i: crate::DiskInfo) -> Self {
        FfiDiskInfo {
            size: i.size,
            logical_sector_size: i.logical_sector_size,
            physical_sector_size: i.physical_sector_size,
            read_only: i.read_only,
            thread_model: i.thread_model,
            can_flush: i.can_flush,
            can_fua: i.can_fua,
            can_discard: i.can_discard,
            can_write_zeroes: i.can_write_zeroes,
            discard_granularity: i.discard_granularity,
        }
    }
}

impl RootModule for PluginModRef {
    declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = "xen_disk_plugin";
    const NAME: &'static str = "xen-disk plugin";
    // The root module's layout is frozen at 1.0 whatever the crate's version: abi_stable
    // compares this string's major version only, and it must never change.
    const VERSION_STRINGS: VersionStrings = VersionStrings::new("1.0.0");
}

/// Items the export macro expands to; not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use abi_stable::library::{
        __call_root_module_loader, CheckTypeLayout, LibHeader, RootModuleResult,
    };
}
