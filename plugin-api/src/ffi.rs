//! The stable ABI: what actually crosses the `.so` boundary (abi_stable types only).
//!
//! Plugin authors never touch this module: [`export_plugin!`](crate::export_plugin) builds
//! the root module from a [`Plugin`](crate::Plugin), and the host wraps what it loads in
//! [`ForeignDisk`](crate::ForeignDisk). It is public so the host (and filter plugins) can
//! name the types.
//!
//! ```text
//!  lib<name>.so exports
//!   ├ xen_disk_plugin_abi_version() -> u32        checked first: a plain C symbol
//!   └ abi_stable LibHeader ─▶ PluginMod (prefix type; layout checked by abi_stable)
//!        ├ abi_version: u32
//!        ├ describe() -> FfiDescriptor             kind, name, version, description, keys
//!        ├ open(config TOML text) -> FfiDisk trait object | FfiError
//!        └ open_over(config, base FfiDisk) -> FfiDisk | FfiError      (filters only)
//! ```
//!
//! The configuration crosses as TOML text, so host and plugin need not share a `toml`
//! version. New fields go at the end of `PluginMod` and new methods at the end of `FfiDisk`;
//! abi_stable then lets old plugins load in a newer host.

use crate::config::KeyType;
use crate::error::ErrorKind;
use crate::{buffers::RawBuf, disk::DiskInfo};
use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings, sabi_trait,
    sabi_types::VersionStrings,
    std_types::{RBox, ROption, RResult, RSlice, RStr, RString, RVec},
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

/// The open-disk interface as a stable trait object.
#[sabi_trait]
pub trait FfiDisk: Send + Sync {
    /// See [`Disk::info`](crate::Disk::info).
    fn info(&self) -> DiskInfo;
    /// See [`Disk::read`](crate::Disk::read).
    fn read(&self, offset: u64, bufs: RSlice<'_, RawBuf>) -> RResult<(), FfiError>;
    /// See [`Disk::write`](crate::Disk::write); `flags` may hold [`WRITE_FUA`].
    fn write(&self, offset: u64, bufs: RSlice<'_, RawBuf>, flags: u32) -> RResult<(), FfiError>;
    /// See [`Disk::flush`](crate::Disk::flush).
    fn flush(&self) -> RResult<(), FfiError>;
    /// See [`Disk::discard`](crate::Disk::discard).
    fn discard(&self, offset: u64, len: u64) -> RResult<(), FfiError>;
    /// See [`Disk::write_zeroes`](crate::Disk::write_zeroes).
    #[sabi(last_prefix_field)]
    fn write_zeroes(&self, offset: u64, len: u64) -> RResult<(), FfiError>;
    /// See [`Disk::submit`](crate::Disk::submit); since ABI 3. The buffers stay valid until
    /// `done` is called.
    fn submit(
        &self,
        op: crate::submit::SubmitOp,
        offset: u64,
        bufs: RSlice<'_, RawBuf>,
        done: FfiCompletion,
    );
}

/// An owned open disk from a plugin (dropping it closes the disk inside the plugin).
pub type FfiDiskBox = FfiDisk_TO<'static, RBox<()>>;

/// The root module every plugin exports.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
// abi_stable refuses a root module with fewer fields than the host's, whatever
// `missing_field` says, so every field added here comes with a new `ABI_VERSION`: the version
// check then refuses an older plugin first, with one line naming both versions.
#[sabi(missing_field(option))]
pub struct PluginMod {
    /// The plugin interface version the plugin was built against ([`crate::ABI_VERSION`]).
    pub abi_version: u32,
    /// Describes the plugin.
    pub describe: extern "C" fn() -> FfiDescriptor,
    /// Opens a disk from configuration TOML text (a filter answers with an error).
    pub open: extern "C" fn(config: RStr<'_>) -> RResult<FfiDiskBox, FfiError>,
    /// Opens a filter's disk over `base`; `None` for plain disk plugins.
    #[sabi(last_prefix_field)]
    pub open_over:
        Option<extern "C" fn(config: RStr<'_>, base: FfiDiskBox) -> RResult<FfiDiskBox, FfiError>>,
    /// True for a filter that never writes its base and wants the host to open the base
    /// read-only ([`Filter::READ_ONLY_BASE`](crate::Filter::READ_ONLY_BASE)); since ABI 2.
    pub read_only_base: extern "C" fn() -> bool,
}

impl RootModule for PluginModRef {
    declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = "xen_disk_plugin";
    const NAME: &'static str = "xen-disk plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

/// Items the export macro expands to; not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use abi_stable::library::{
        __call_root_module_loader, CheckTypeLayout, LibHeader, RootModuleResult,
    };
}
