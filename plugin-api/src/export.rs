//! The glue between the safe traits and the stable ABI, both ways.
//!
//! Plugin side: [`root_module`] turns a [`Plugin`] into the [`PluginMod`] that
//! [`export_plugin!`](crate::export_plugin) exports; every call into the plugin runs under
//! `catch_unwind`, so a panic becomes an [`ErrorKind::Panic`] error with the panic message
//! and never unwinds into the host.
//!
//! Host side: [`ForeignDisk`] wraps a loaded plugin's disk object back into the safe
//! [`Disk`] trait, so the host, the conformance suite and filter plugins all speak `Disk`.

use crate::buffers::{RawBuf, ReadBufs, WriteBufs};
use crate::config::Config;
use crate::disk::{Disk, DiskInfo, Filter, Plugin};
use crate::error::{Error, ErrorKind, Result};
use crate::ffi::*;
use crate::submit::{Submission, SubmitOp};
use abi_stable::prefix_type::PrefixTypeTrait;
use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{ROption, RResult, RSlice, RSliceMut, RStr, RString};
use std::panic::{catch_unwind, AssertUnwindSafe};

impl From<Error> for FfiError {
    fn from(e: Error) -> Self {
        FfiError {
            kind: e.kind(),
            errno: e.errno(),
            message: RString::from(e.message()),
        }
    }
}

impl From<FfiError> for Error {
    fn from(e: FfiError) -> Self {
        Error::from_parts(e.kind, e.errno, e.message.into_string())
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}

/// Runs `f`, turning an error or a panic into an `FfiError`.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> RResult<T, FfiError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => RResult::ROk(v),
        Ok(Err(e)) => RResult::RErr(e.into()),
        Err(payload) => RResult::RErr(
            Error::new(
                ErrorKind::Panic,
                format!("plugin panicked in {what}: {}", panic_message(payload)),
            )
            .into(),
        ),
    }
}

struct Exported<D>(D);

impl<D: Disk> FfiDisk for Exported<D> {
    fn info(&self) -> FfiDiskInfo {
        // info cannot report an error; a panicking info() yields an empty, read-only disk so
        // the host refuses it rather than unwinding.
        catch_unwind(AssertUnwindSafe(|| self.0.info()))
            .unwrap_or(DiskInfo::new(0).read_only(true))
            .into()
    }

    fn read(&self, offset: u64, bufs: RSlice<'_, RawBuf>) -> RResult<(), FfiError> {
        guarded("read", || {
            // SAFETY: the host built these buffers under ReadBufs::from_raw's contract
            // (ForeignDisk::read passes on a ReadBufs it was given).
            let mut b = unsafe { ReadBufs::from_raw(bufs.as_slice()) };
            self.0.read(offset, &mut b)
        })
    }

    fn write(&self, offset: u64, bufs: RSlice<'_, RawBuf>, flags: u32) -> RResult<(), FfiError> {
        guarded("write", || {
            // SAFETY: as in read, under WriteBufs::from_raw's contract.
            let b = unsafe { WriteBufs::from_raw(bufs.as_slice()) };
            if flags & WRITE_FUA != 0 {
                self.0.write_fua(offset, &b)
            } else {
                self.0.write(offset, &b)
            }
        })
    }

    fn flush(&self) -> RResult<(), FfiError> {
        guarded("flush", || self.0.flush())
    }

    fn discard(&self, offset: u64, len: u64) -> RResult<(), FfiError> {
        guarded("discard", || self.0.discard(offset, len))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> RResult<(), FfiError> {
        guarded("write_zeroes", || self.0.write_zeroes(offset, len))
    }

    fn submit(&self, op: SubmitOp, offset: u64, bufs: RSlice<'_, RawBuf>, done: FfiCompletion) {
        // SAFETY: the host's FfiDisk::submit contract: the buffers stay valid until `done`.
        let sub = unsafe { Submission::from_raw_slice(op, offset, bufs.as_slice(), done) };
        // A panic drops the submission while unwinding (or the plugin already dropped it),
        // which answers the request with an error; it never unwinds into the host.
        let _ = catch_unwind(AssertUnwindSafe(|| self.0.submit(sub)));
    }

    fn extension(
        &self,
        id: u32,
        input: RSlice<'_, u8>,
        output: RSliceMut<'_, u8>,
    ) -> RResult<u32, FfiError> {
        guarded("extension", || {
            crate::extension::serve_disk(&self.0, id, input.as_slice(), output.into_mut_slice())
        })
    }
}

extern "C" fn module_extension(
    id: u32,
    input: RSlice<'_, u8>,
    output: RSliceMut<'_, u8>,
) -> RResult<u32, FfiError> {
    guarded("extension", || {
        crate::extension::serve_module(id, input.as_slice(), output.into_mut_slice())
    })
}

/// Wraps a safe disk as an FFI object (what `open` returns; also how a filter plugin hands a
/// disk it built on).
pub fn export_disk<D: Disk>(disk: D) -> FfiDiskBox {
    FfiDisk_TO::from_value(Exported(disk), TD_Opaque)
}

fn descriptor(
    kind: PluginKind,
    name: &'static str,
    version: &'static str,
    description: &'static str,
    keys: &'static [crate::config::ConfigKey],
) -> FfiDescriptor {
    FfiDescriptor {
        kind,
        name: RStr::from_str(name),
        version: RStr::from_str(version),
        description: RStr::from_str(description),
        config_keys: keys
            .iter()
            .map(|k| FfiConfigKey {
                name: RStr::from_str(k.name),
                ty: k.ty,
                default: match k.default {
                    Some(d) => ROption::RSome(RStr::from_str(d)),
                    None => ROption::RNone,
                },
                required: k.required,
                help: RStr::from_str(k.help),
            })
            .collect(),
    }
}

extern "C" fn describe<P: Plugin>() -> FfiDescriptor {
    descriptor(
        PluginKind::Disk,
        P::NAME,
        P::VERSION,
        P::DESCRIPTION,
        P::CONFIG_KEYS,
    )
}

extern "C" fn describe_filter<F: Filter>() -> FfiDescriptor {
    descriptor(
        PluginKind::Filter,
        F::NAME,
        F::VERSION,
        F::DESCRIPTION,
        F::CONFIG_KEYS,
    )
}

extern "C" fn open<P: Plugin>(config: RStr<'_>) -> RResult<FfiDiskBox, FfiError> {
    guarded("open", || {
        let mut config = Config::from_toml(config.as_str())?;
        config.validate(P::NAME, P::CONFIG_KEYS, &[])?;
        P::open(&config).map(export_disk)
    })
}

extern "C" fn open_filter_alone<F: Filter>(_config: RStr<'_>) -> RResult<FfiDiskBox, FfiError> {
    RResult::RErr(
        Error::new(
            ErrorKind::Config,
            format!(
                "{} is a filter: give it a base disk (e.g. -c base=file -c base.path=IMG)",
                F::NAME
            ),
        )
        .into(),
    )
}

extern "C" fn open_over<F: Filter>(
    config: RStr<'_>,
    base: FfiDiskBox,
) -> RResult<FfiDiskBox, FfiError> {
    guarded("open", || {
        let mut config = Config::from_toml(config.as_str())?;
        config.validate(F::NAME, F::CONFIG_KEYS, &[])?;
        F::open(&config, ForeignDisk::new(base)).map(export_disk)
    })
}

extern "C" fn no() -> bool {
    false
}

extern "C" fn read_only_base<F: Filter>() -> bool {
    F::READ_ONLY_BASE
}

/// Builds the root module for plugin `P` (called once, when the host loads the library).
#[doc(hidden)]
pub fn root_module<P: Plugin>() -> PluginModRef {
    PluginMod {
        abi_version: crate::ABI_VERSION,
        describe: describe::<P>,
        open: open::<P>,
        open_over: None,
        read_only_base: no,
        extension: module_extension,
    }
    .leak_into_prefix()
}

/// Builds the root module for filter `F`.
#[doc(hidden)]
pub fn filter_root_module<F: Filter>() -> PluginModRef {
    PluginMod {
        abi_version: crate::ABI_VERSION,
        describe: describe_filter::<F>,
        open: open_filter_alone::<F>,
        open_over: Some(open_over::<F>),
        read_only_base: read_only_base::<F>,
        extension: module_extension,
    }
    .leak_into_prefix()
}

/// A disk opened by a loaded plugin, seen through the safe [`Disk`] trait.
pub struct ForeignDisk {
    inner: FfiDiskBox,
}

impl ForeignDisk {
    /// Wraps a disk object a plugin returned.
    pub fn new(inner: FfiDiskBox) -> Self {
        ForeignDisk { inner }
    }

    /// Opens a disk with a loaded root module.
    pub fn open(module: PluginModRef, config: &Config) -> Result<Self> {
        let text = config.to_toml();
        (module.open())(RStr::from_str(&text))
            .into_result()
            .map(ForeignDisk::new)
            .map_err(Error::from)
    }

    /// Opens a filter's disk over `base` with a loaded root module.
    pub fn open_over(module: PluginModRef, config: &Config, base: ForeignDisk) -> Result<Self> {
        let Some(open_over) = module.open_over() else {
            return Err(Error::new(
                ErrorKind::Config,
                "this plugin is not a filter: it takes no base disk",
            ));
        };
        let text = config.to_toml();
        open_over(RStr::from_str(&text), base.inner)
            .into_result()
            .map(ForeignDisk::new)
            .map_err(Error::from)
    }
}

impl Disk for ForeignDisk {
    fn info(&self) -> DiskInfo {
        crate::extension::ask_disk(&self.inner, self.inner.info().into())
    }

    fn read(&self, offset: u64, bufs: &mut ReadBufs<'_>) -> Result<()> {
        self.inner
            .read(offset, RSlice::from_slice(bufs.raw()))
            .into_result()
            .map_err(Error::from)
    }

    fn write(&self, offset: u64, bufs: &WriteBufs<'_>) -> Result<()> {
        self.inner
            .write(offset, RSlice::from_slice(bufs.raw()), 0)
            .into_result()
            .map_err(Error::from)
    }

    fn write_fua(&self, offset: u64, bufs: &WriteBufs<'_>) -> Result<()> {
        self.inner
            .write(offset, RSlice::from_slice(bufs.raw()), WRITE_FUA)
            .into_result()
            .map_err(Error::from)
    }

    fn flush(&self) -> Result<()> {
        self.inner.flush().into_result().map_err(Error::from)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.inner
            .discard(offset, len)
            .into_result()
            .map_err(Error::from)
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<crate::disk::Extent>> {
        crate::extension::ask_extents(&self.inner, offset, len)
    }

    fn attach_completions(&self) -> Option<i32> {
        crate::extension::ask_completions(&self.inner, ext::COMPLETIONS_ATTACH)
    }

    fn take_completions(&self) {
        crate::extension::ask_completions(&self.inner, ext::COMPLETIONS_TAKE);
    }

    fn detach_completions(&self) {
        crate::extension::ask_completions(&self.inner, ext::COMPLETIONS_DETACH);
    }

    fn submit(&self, submission: Submission) {
        let (op, offset, bufs, done) = submission.into_parts();
        self.inner
            .submit(op, offset, RSlice::from_slice(&bufs), done);
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.inner
            .write_zeroes(offset, len)
            .into_result()
            .map_err(Error::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffers::with_read_bufs;
    use crate::config::{ConfigKey, KeyType};

    struct Boom;
    impl Disk for Boom {
        fn info(&self) -> DiskInfo {
            DiskInfo::new(4096)
        }
        fn read(&self, _: u64, _: &mut ReadBufs<'_>) -> Result<()> {
            panic!("kaboom {}", 42)
        }
        fn write(&self, _: u64, _: &WriteBufs<'_>) -> Result<()> {
            Err(Error::io(5, "disk on fire"))
        }
    }

    struct BoomPlugin;
    impl Plugin for BoomPlugin {
        type Disk = Boom;
        const NAME: &'static str = "boom";
        const VERSION: &'static str = "1";
        const DESCRIPTION: &'static str = "fails";
        const CONFIG_KEYS: &'static [ConfigKey] =
            &[ConfigKey::optional("x", KeyType::Bool, "false", "x")];
        fn open(_: &Config) -> Result<Boom> {
            Ok(Boom)
        }
    }

    #[test]
    fn panics_and_errors_become_values() {
        let m = root_module::<BoomPlugin>();
        let d = ForeignDisk::open(m, &Config::new()).unwrap();
        let mut buf = [0u8; 512];
        let e = with_read_bufs(&mut [&mut buf], |b| d.read(0, b)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Panic);
        assert!(e.message().contains("kaboom 42"), "{e}");
        let e = crate::buffers::with_write_bufs(&[&buf], |b| d.write(0, b)).unwrap_err();
        assert_eq!(
            (e.kind(), e.errno(), e.message()),
            (ErrorKind::Io, 5, "disk on fire")
        );
        assert_eq!(d.discard(0, 1).unwrap_err().kind(), ErrorKind::Unsupported);
    }

    /// A filter that shifts every offset by one sector of the base.
    struct Shift(ForeignDisk);
    impl Disk for Shift {
        fn info(&self) -> DiskInfo {
            DiskInfo::new(self.0.info().size - 512)
        }
        fn read(&self, offset: u64, bufs: &mut ReadBufs<'_>) -> Result<()> {
            self.0.read(offset + 512, bufs)
        }
        fn write(&self, offset: u64, bufs: &WriteBufs<'_>) -> Result<()> {
            self.0.write(offset + 512, bufs)
        }
    }
    struct ShiftFilter;
    impl Filter for ShiftFilter {
        type Disk = Shift;
        const NAME: &'static str = "shift";
        const VERSION: &'static str = "1";
        const DESCRIPTION: &'static str = "shifts";
        const CONFIG_KEYS: &'static [ConfigKey] = &[];
        fn open(_: &Config, base: ForeignDisk) -> Result<Shift> {
            Ok(Shift(base))
        }
    }

    struct Ram(std::sync::Mutex<Vec<u8>>);
    impl Disk for Ram {
        fn info(&self) -> DiskInfo {
            DiskInfo::new(self.0.lock().unwrap().len() as u64)
        }
        fn read(&self, offset: u64, bufs: &mut ReadBufs<'_>) -> Result<()> {
            bufs.copy_from(&self.0.lock().unwrap()[offset as usize..][..bufs.len()]);
            Ok(())
        }
        fn write(&self, offset: u64, bufs: &WriteBufs<'_>) -> Result<()> {
            bufs.copy_to(&mut self.0.lock().unwrap()[offset as usize..][..bufs.len()]);
            Ok(())
        }
    }

    #[test]
    fn filters_open_over_a_base_and_stack() {
        let m = filter_root_module::<ShiftFilter>();
        assert_eq!((m.describe())().kind, PluginKind::Filter);
        // Filters write their base unless they declare otherwise; plain plugins have none.
        assert!(!(m.read_only_base())());
        assert!(!(root_module::<BoomPlugin>().read_only_base())());
        assert!(ForeignDisk::open(m, &Config::new())
            .err()
            .unwrap()
            .message()
            .contains("is a filter"));
        let base = ForeignDisk::new(export_disk(Ram(std::sync::Mutex::new(vec![0; 4096]))));
        let one = ForeignDisk::open_over(m, &Config::new(), base).unwrap();
        let two = ForeignDisk::open_over(m, &Config::new(), one).unwrap();
        assert_eq!(two.info().size, 4096 - 1024);
        crate::buffers::with_write_bufs(&[&[7u8; 512]], |b| two.write(0, b)).unwrap();
        let mut out = [0u8; 512];
        with_read_bufs(&mut [&mut out], |b| two.read(0, b)).unwrap();
        assert_eq!(out, [7u8; 512]);
        // A plain plugin is not a filter.
        let plain = root_module::<BoomPlugin>();
        let base = ForeignDisk::new(export_disk(Ram(std::sync::Mutex::new(vec![0; 4096]))));
        assert!(ForeignDisk::open_over(plain, &Config::new(), base)
            .err()
            .unwrap()
            .message()
            .contains("not a filter"));
    }

    #[test]
    fn open_checks_config_before_the_plugin_sees_it() {
        let m = root_module::<BoomPlugin>();
        let bad = Config::from_pairs(&["y=1"]).unwrap();
        let e = ForeignDisk::open(m, &bad).err().unwrap();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(e.message().contains("`y`"), "{e}");
        let d = (m.describe())();
        assert_eq!(d.name.as_str(), "boom");
        assert_eq!(d.config_keys.len(), 1);
    }

    /// Answers a fixed list of extents whatever it is asked (a careless plugin).
    struct Mapped(Vec<crate::Extent>);
    impl Disk for Mapped {
        fn info(&self) -> DiskInfo {
            DiskInfo::new(1 << 20)
        }
        fn read(&self, _: u64, _: &mut ReadBufs<'_>) -> Result<()> {
            Ok(())
        }
        fn write(&self, _: u64, _: &WriteBufs<'_>) -> Result<()> {
            Ok(())
        }
        fn extents(&self, _: u64, _: u64) -> Result<Vec<crate::Extent>> {
            Ok(self.0.clone())
        }
    }

    #[test]
    fn block_status_crosses_the_boundary_and_stops_at_the_asked_range() {
        use crate::Extent;
        let runs = vec![Extent::hole(4096), Extent::data(512), Extent::zero(8192)];
        let d = ForeignDisk::new(export_disk(Mapped(runs.clone())));
        assert_eq!(d.extents(0, 1 << 20).unwrap(), runs);
        // Extents past the asked length are dropped, never passed on.
        assert_eq!(d.extents(0, 4608).unwrap(), runs[..2].to_vec());
        // Nothing inside the range: an error, not an empty answer.
        let d = ForeignDisk::new(export_disk(Mapped(vec![Extent::data(1 << 21)])));
        assert!(d.extents(0, 4096).is_err());
        // A disk that does not report answers "unsupported", as a 1.0 plugin does.
        let d = ForeignDisk::new(export_disk(Ram(std::sync::Mutex::new(vec![0; 4096]))));
        assert_eq!(
            d.extents(0, 4096).unwrap_err().kind(),
            ErrorKind::Unsupported
        );
    }

    /// Offers descriptor 42 to one attacher at a time and counts the calls.
    #[derive(Default)]
    struct Offering {
        attached: std::sync::atomic::AtomicBool,
        takes: std::sync::atomic::AtomicUsize,
    }
    impl Disk for Offering {
        fn info(&self) -> DiskInfo {
            DiskInfo::new(1 << 20)
        }
        fn read(&self, _: u64, _: &mut ReadBufs<'_>) -> Result<()> {
            Ok(())
        }
        fn write(&self, _: u64, _: &WriteBufs<'_>) -> Result<()> {
            Ok(())
        }
        fn attach_completions(&self) -> Option<i32> {
            use std::sync::atomic::Ordering::SeqCst;
            (!self.attached.swap(true, SeqCst)).then_some(42)
        }
        fn take_completions(&self) {
            if !self.attached.load(std::sync::atomic::Ordering::SeqCst) {
                panic!("taken while not attached");
            }
            self.takes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        fn detach_completions(&self) {
            self.attached
                .store(false, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn completions_attach_take_and_detach_cross_the_boundary() {
        let d = ForeignDisk::new(export_disk(Offering::default()));
        assert_eq!(d.attach_completions(), Some(42));
        // One attacher at a time: the disk's answer crosses as it is.
        assert_eq!(d.attach_completions(), None);
        d.take_completions();
        d.take_completions();
        d.detach_completions();
        assert_eq!(d.attach_completions(), Some(42));
        d.detach_completions();
        // A panic in the plugin's take stays in the plugin.
        d.take_completions();
        // A disk that does not offer them declines, as one built before ABI 1.3 does.
        let d = ForeignDisk::new(export_disk(Ram(std::sync::Mutex::new(vec![0; 4096]))));
        assert_eq!(d.attach_completions(), None);
    }
}
