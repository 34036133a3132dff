//! C plugins: libraries that export `xen_disk_plugin_init` (plugin-api/include/
//! xen_disk_plugin.h) instead of the Rust SDK's root module.
//!
//! The host copies the plugin's size-prefixed struct into its own (fields the plugin's
//! struct does not reach stay zero: absent), checks it once at load, and wraps each opened
//! disk as an ordinary [`Disk`], so everything above (guard, filters, check, bench, hot swap)
//! treats it as a Rust plugin's disk. What a C callback returns is hostile input: a wrong
//! byte count, an error code outside errno's range or a positive one fails that request with
//! EIO; a NULL handle from `open` fails the open. A crash inside the plugin is not
//! containable; its answers are.

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::{Arc, Mutex};
use xen_disk_plugin_api::{
    abi_major, abi_minor, abi_version, export_disk, Config, ConfigKey, Disk, DiskInfo, Error,
    ErrorKind, ForeignDisk, KeyType, ReadBufs, Result, ThreadModel, WriteBufs,
};

/// The entry point's name.
pub const INIT_SYMBOL: &str = "xen_disk_plugin_init";

/// The C API version this host speaks (the header's `XEN_DISK_API_VERSION`).
pub const C_API_VERSION: u32 = abi_version(1, 1);

/// `struct xen_disk_config_key`.
#[repr(C)]
struct CKey {
    name: *const c_char,
    ty: u32,
    required: u32,
    default_value: *const c_char,
    help: *const c_char,
}

/// `struct xen_disk_host`.
#[repr(C)]
pub struct CHost {
    size: u32,
    api_version: u32,
    set_error: extern "C" fn(message: *const c_char),
}

type ConfigFn = unsafe extern "C" fn(*mut *mut c_void, *const c_char, *const c_char) -> i32;
type IoFn = unsafe extern "C" fn(*mut c_void, *mut c_void, u32, u64) -> i64;
type WriteFn = unsafe extern "C" fn(*mut c_void, *const c_void, u32, u64, u32) -> i64;
type RangeFn = unsafe extern "C" fn(*mut c_void, u64, u64) -> i32;

/// `struct xen_disk_plugin` as API 1.1 defines it. Every field is valid when zero (the
/// callbacks are `Option`s), so a shorter struct from an older plugin is copied over a zeroed
/// one.
#[repr(C)]
#[derive(Clone, Copy)]
struct CPluginStruct {
    size: u32,
    api_version: u32,
    name: *const c_char,
    version: *const c_char,
    description: *const c_char,
    thread_model: u32,
    sector_size: u32,
    can_fua: u32,
    reserved: u32,
    config_keys: *const CKey,
    config: Option<ConfigFn>,
    config_free: Option<unsafe extern "C" fn(*mut c_void)>,
    open: Option<unsafe extern "C" fn(*mut c_void) -> *mut c_void>,
    close: Option<unsafe extern "C" fn(*mut c_void)>,
    get_size: Option<unsafe extern "C" fn(*mut c_void) -> i64>,
    pread: Option<IoFn>,
    pwrite: Option<WriteFn>,
    flush: Option<unsafe extern "C" fn(*mut c_void) -> i32>,
    trim: Option<RangeFn>,
    zero: Option<RangeFn>,
    // 1.1
    discard_granularity: u32,
    discard_alignment: u32,
}

/// Where API 1.0's struct ends: the smallest struct the host accepts.
const SIZE_1_0: usize = std::mem::offset_of!(CPluginStruct, discard_granularity);

thread_local! {
    /// The message the current callback attached with `set_error`.
    static LAST_ERROR: RefCell<Option<String>> = const { RefCell::new(None) };
}

extern "C" fn set_error(message: *const c_char) {
    if message.is_null() {
        return;
    }
    // SAFETY: the header asks for a NUL-terminated string, valid for the call.
    let text = unsafe { CStr::from_ptr(message) }
        .to_string_lossy()
        .into_owned();
    LAST_ERROR.with(|e| *e.borrow_mut() = Some(text));
}

static HOST: CHost = CHost {
    size: std::mem::size_of::<CHost>() as u32,
    api_version: C_API_VERSION,
    set_error,
};

fn take_message() -> Option<String> {
    LAST_ERROR.with(|e| e.borrow_mut().take())
}

/// Why a C plugin's struct was refused (one line, after the file name).
fn refuse(reason: impl Into<String>) -> String {
    reason.into()
}

/// A string field of the struct: `'static` because the library is never unloaded.
fn c_str(p: *const c_char, field: &str) -> std::result::Result<&'static str, String> {
    if p.is_null() {
        return Err(refuse(format!("`{field}` is NULL")));
    }
    // SAFETY: a non-NULL string field of the plugin's struct, NUL-terminated per the header,
    // in a library that stays mapped for the life of the process.
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|_| refuse(format!("`{field}` is not UTF-8")))
}

/// A loaded C plugin: its struct (checked) and what it declares.
pub struct CPlugin {
    raw: CPluginStruct,
    /// `name`.
    pub name: &'static str,
    /// `version`.
    pub version: &'static str,
    /// `description`.
    pub description: &'static str,
    /// The declared keys.
    pub keys: Vec<ConfigKey>,
    /// The API version it was built for.
    pub api_version: u32,
}

// SAFETY: the struct holds pointers to the library's constant data and functions, which the
// header requires to stay valid and callable from any thread for the life of the process.
unsafe impl Send for CPlugin {}
// SAFETY: as for Send; the host never writes through them.
unsafe impl Sync for CPlugin {}

impl CPlugin {
    /// Calls the entry point and checks what it returns.
    ///
    /// # Safety
    /// `init` must be the library's `xen_disk_plugin_init`, and the library must stay loaded.
    pub unsafe fn init(
        init: unsafe extern "C" fn(*const CHost) -> *const c_void,
    ) -> std::result::Result<CPlugin, String> {
        // SAFETY: the caller's contract; HOST is static.
        let p = unsafe { init(&HOST) } as *const u8;
        if p.is_null() {
            return Err(refuse(format!(
                "{INIT_SYMBOL} returned NULL{}",
                take_message().map(|m| format!(": {m}")).unwrap_or_default()
            )));
        }
        // SAFETY: the header puts `uint32_t size` first in the struct the plugin returned.
        let size = unsafe { std::ptr::read_unaligned(p as *const u32) } as usize;
        // SAFETY: as above, the second field.
        let version = unsafe { std::ptr::read_unaligned(p.add(4) as *const u32) };
        if abi_major(version) != 1 {
            return Err(refuse(format!(
                "built for C plugin API {}.{}; this host speaks {}.{} and loads 1.x",
                abi_major(version),
                abi_minor(version),
                abi_major(C_API_VERSION),
                abi_minor(C_API_VERSION)
            )));
        }
        if size < SIZE_1_0 {
            return Err(refuse(format!(
                "its struct xen_disk_plugin is {size} bytes, less than API 1.0's {SIZE_1_0}"
            )));
        }
        let mut raw = std::mem::MaybeUninit::<CPluginStruct>::zeroed();
        let n = size.min(std::mem::size_of::<CPluginStruct>());
        // SAFETY: the plugin's struct is `size` bytes long (its own declaration); we copy at
        // most our struct's size into a zeroed one, and zero is valid for every field.
        let raw = unsafe {
            std::ptr::copy_nonoverlapping(p, raw.as_mut_ptr() as *mut u8, n);
            raw.assume_init()
        };
        let name = c_str(raw.name, "name")?;
        let ver = c_str(raw.version, "version")?;
        let description = c_str(raw.description, "description")?;
        for (field, missing) in [
            ("open", raw.open.is_none()),
            ("close", raw.close.is_none()),
            ("get_size", raw.get_size.is_none()),
            ("pread", raw.pread.is_none()),
        ] {
            if missing {
                return Err(refuse(format!("required callback `{field}` is NULL")));
            }
        }
        if raw.thread_model > 1 {
            return Err(refuse(format!(
                "thread_model {} is unknown",
                raw.thread_model
            )));
        }
        let mut keys = Vec::new();
        if !raw.config_keys.is_null() {
            for i in 0.. {
                // SAFETY: the header's array of keys, ended by an entry whose name is NULL.
                let k = unsafe { &*raw.config_keys.add(i) };
                if k.name.is_null() {
                    break;
                }
                if i == 256 {
                    return Err(refuse("config_keys has no end (over 256 keys)"));
                }
                let kname = c_str(k.name, "config_keys[].name")?;
                let ty = match k.ty {
                    0 => KeyType::String,
                    1 => KeyType::Path,
                    2 => KeyType::Bool,
                    3 => KeyType::Integer,
                    4 => KeyType::Size,
                    t => return Err(refuse(format!("config key `{kname}`: type {t} is unknown"))),
                };
                let help = if k.help.is_null() {
                    ""
                } else {
                    c_str(k.help, "help")?
                };
                let default = if k.default_value.is_null() {
                    None
                } else {
                    Some(c_str(k.default_value, "default_value")?)
                };
                keys.push(ConfigKey {
                    name: kname,
                    ty,
                    default,
                    required: k.required != 0,
                    help,
                });
            }
            if !keys.is_empty() && raw.config.is_none() {
                return Err(refuse(
                    "it declares config_keys but its `config` callback is NULL",
                ));
            }
        }
        Ok(CPlugin {
            raw,
            name,
            version: ver,
            description,
            keys,
            api_version: version,
        })
    }

    fn value_text(&self, config: &Config, key: &ConfigKey) -> Result<Option<String>> {
        if !config.contains(key.name) {
            return Ok(None);
        }
        Ok(Some(match key.ty {
            KeyType::String | KeyType::Path => config.str(key.name)?.to_string(),
            KeyType::Bool => config.bool(key.name)?.to_string(),
            KeyType::Integer => config.u64(key.name)?.to_string(),
            KeyType::Size => config.size(key.name)?.to_string(),
        }))
    }

    /// Opens a disk: checks `config` against the declared keys, passes each value to
    /// `config`, then calls `open`.
    pub fn open(self: &Arc<Self>, config: &Config) -> Result<ForeignDisk> {
        let mut config = config.clone();
        config.validate(self.name, &self.keys, &[])?;
        let read_only = self
            .keys
            .iter()
            .any(|k| k.name == "readonly" && k.ty == KeyType::Bool)
            && config.bool("readonly")?;
        let mut state: *mut c_void = std::ptr::null_mut();
        take_message();
        for key in &self.keys {
            let Some(value) = self.value_text(&config, key)? else {
                continue;
            };
            let (k, v) = (cstring(key.name)?, cstring(&value)?);
            let config_fn = self.raw.config.expect("checked at load");
            // SAFETY: the header's config callback, with NUL-terminated strings that outlive
            // the call and the plugin's own state pointer.
            let ret = unsafe { config_fn(&mut state, k.as_ptr(), v.as_ptr()) };
            if ret != 0 {
                if let Some(free) = self.raw.config_free {
                    // SAFETY: the state config built, given back once, as the header says.
                    unsafe { free(state) };
                }
                return Err(Error::config(
                    key.name,
                    format!(
                        "refused by plugin {}: {}",
                        self.name,
                        describe_code(ret as i64, take_message())
                    ),
                ));
            }
        }
        let open = self.raw.open.expect("checked at load");
        // SAFETY: the header's open callback; it takes the state.
        let handle = unsafe { open(state) };
        if handle.is_null() {
            return Err(Error::io(
                libc::EIO,
                take_message().unwrap_or_else(|| "open returned NULL".into()),
            ));
        }
        let disk = CDisk {
            plugin: self.clone(),
            pread: self.raw.pread.expect("checked at load"),
            pwrite: self.raw.pwrite,
            handle,
            serial: (self.raw.thread_model == 0).then(|| Mutex::new(())),
            size: std::sync::atomic::AtomicU64::new(0),
            read_only: read_only || self.raw.pwrite.is_none(),
        };
        let size = disk.get_size()?;
        disk.size.store(size, std::sync::atomic::Ordering::Relaxed);
        Ok(ForeignDisk::new(export_disk(disk)))
    }
}

fn cstring(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::msg(format!("{s:?} holds a NUL byte")))
}

/// What an error code means: a negative errno, or a hostile value.
fn describe_code(ret: i64, message: Option<String>) -> String {
    let base = match errno_of(ret) {
        Some(e) => std::io::Error::from_raw_os_error(e).to_string(),
        None => format!("unknown error code {ret}"),
    };
    match message {
        Some(m) => format!("{m} ({base})"),
        None => base,
    }
}

/// The errno a negative return stands for, when it is one (Linux's errnos are 1 to 133).
fn errno_of(ret: i64) -> Option<i32> {
    (-133..=-1).contains(&ret).then(|| -ret as i32)
}

/// One open disk of a C plugin.
struct CDisk {
    plugin: Arc<CPlugin>,
    /// The data callbacks, copied here: one load each per request instead of two.
    pread: IoFn,
    pwrite: Option<WriteFn>,
    handle: *mut c_void,
    /// Held around each call when the plugin declared `XEN_DISK_THREAD_SERIALIZED`.
    serial: Option<Mutex<()>>,
    /// The last size `get_size` gave (what `info` keeps when a later call fails).
    size: std::sync::atomic::AtomicU64,
    read_only: bool,
}

// SAFETY: the handle is the plugin's; the header makes a parallel plugin's callbacks safe to
// call from any thread, and a serialized one's are called under `serial`.
unsafe impl Send for CDisk {}
// SAFETY: as for Send.
unsafe impl Sync for CDisk {}

impl CDisk {
    fn lock(&self) -> Option<std::sync::MutexGuard<'_, ()>> {
        self.serial
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The error for a failed or hostile answer of `what`.
    #[cold]
    fn fail(&self, what: &str, ret: i64) -> Error {
        let text = describe_code(ret, take_message());
        let errno = errno_of(ret).unwrap_or(libc::EIO);
        let kind = if errno == libc::EOPNOTSUPP && errno_of(ret).is_some() {
            ErrorKind::Unsupported
        } else {
            ErrorKind::Io
        };
        Error::from_parts(
            kind,
            errno,
            format!("plugin {}: {what}: {text}", self.plugin.name),
        )
    }

    fn code(&self, what: &str, ret: i32) -> Result<()> {
        if ret == 0 {
            Ok(())
        } else {
            Err(self.fail(what, i64::from(ret)))
        }
    }

    fn get_size(&self) -> Result<u64> {
        let _serial = self.lock();
        let f = self.plugin.raw.get_size.expect("checked at load");
        // SAFETY: the header's get_size with the handle open returned.
        let ret = unsafe { f(self.handle) };
        if ret < 0 {
            return Err(self.fail("get_size", ret));
        }
        Ok(ret as u64)
    }

    /// Checks a pread/pwrite answer: exactly `count` bytes, or a negative errno.
    #[inline(always)]
    fn count(&self, what: &str, ret: i64, count: usize, offset: u64) -> Result<()> {
        if ret == count as i64 {
            Ok(())
        } else {
            Err(self.bad_count(what, ret, count, offset))
        }
    }

    #[cold]
    #[inline(never)]
    fn bad_count(&self, what: &str, ret: i64, count: usize, offset: u64) -> Error {
        if ret < 0 {
            // A negative errno, or a code outside errno's range (reported as unknown).
            return self.fail(&format!("{what} at {offset}+{count}"), ret);
        }
        take_message();
        Error::io(
            libc::EIO,
            format!(
                "plugin {}: {what} at {offset}+{count} returned {ret}, not {count} bytes \
                 or a negative errno",
                self.plugin.name
            ),
        )
    }
}

impl Disk for CDisk {
    fn info(&self) -> DiskInfo {
        let size = match self.get_size() {
            Ok(s) => {
                self.size.store(s, std::sync::atomic::Ordering::Relaxed);
                s
            }
            Err(_) => self.size.load(std::sync::atomic::Ordering::Relaxed),
        };
        let raw = &self.plugin.raw;
        let sector = if raw.sector_size == 0 {
            512
        } else {
            raw.sector_size
        };
        DiskInfo::new(size)
            .sector_size(sector)
            .read_only(self.read_only)
            .thread_model(if raw.thread_model == 0 {
                ThreadModel::Serialized
            } else {
                ThreadModel::Parallel
            })
            .flush(raw.flush.is_some())
            .fua(raw.can_fua != 0 && raw.pwrite.is_some() && raw.flush.is_some())
            .discard(raw.trim.is_some() && !self.read_only)
            .write_zeroes(raw.zero.is_some() && !self.read_only)
            .discard_granularity(raw.discard_granularity)
            .discard_alignment(raw.discard_alignment)
    }

    #[inline]
    fn read(&self, offset: u64, bufs: &mut ReadBufs<'_>) -> Result<()> {
        let _serial = self.lock();
        let mut at = offset;
        for b in bufs.raw() {
            // SAFETY: the header's pread, into a buffer valid for writes of `b.len` bytes
            // (ReadBufs' contract), which nothing else touches during the call.
            let ret = unsafe { (self.pread)(self.handle, b.base as *mut c_void, b.len as u32, at) };
            self.count("pread", ret, b.len, at)?;
            at += b.len as u64;
        }
        Ok(())
    }

    #[inline]
    fn write(&self, offset: u64, bufs: &WriteBufs<'_>) -> Result<()> {
        self.write_flags(offset, bufs, 0)
    }

    fn write_fua(&self, offset: u64, bufs: &WriteBufs<'_>) -> Result<()> {
        if self.plugin.raw.can_fua != 0 {
            self.write_flags(offset, bufs, 1)
        } else {
            self.write(offset, bufs)?;
            self.flush()
        }
    }

    fn flush(&self) -> Result<()> {
        let Some(f) = self.plugin.raw.flush else {
            return Ok(());
        };
        let _serial = self.lock();
        // SAFETY: the header's flush with the open handle.
        self.code("flush", unsafe { f(self.handle) })
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let Some(f) = self.plugin.raw.trim else {
            return Err(Error::unsupported("discard"));
        };
        let _serial = self.lock();
        // SAFETY: the header's trim with the open handle.
        self.code(&format!("trim at {offset}+{len}"), unsafe {
            f(self.handle, len, offset)
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let Some(f) = self.plugin.raw.zero else {
            return Err(Error::unsupported("write-zeroes"));
        };
        let _serial = self.lock();
        // SAFETY: the header's zero with the open handle.
        self.code(&format!("zero at {offset}+{len}"), unsafe {
            f(self.handle, len, offset)
        })
    }
}

impl CDisk {
    #[inline]
    fn write_flags(&self, offset: u64, bufs: &WriteBufs<'_>, flags: u32) -> Result<()> {
        let Some(f) = self.pwrite else {
            return Err(Error::new(ErrorKind::ReadOnly, "the disk is read-only"));
        };
        let _serial = self.lock();
        let mut at = offset;
        for b in bufs.raw() {
            // SAFETY: the header's pwrite, from a buffer valid for reads of `b.len` bytes
            // (WriteBufs' contract).
            let ret = unsafe {
                f(
                    self.handle,
                    b.base as *const c_void,
                    b.len as u32,
                    at,
                    flags,
                )
            };
            self.count("pwrite", ret, b.len, at)?;
            at += b.len as u64;
        }
        Ok(())
    }
}

impl Drop for CDisk {
    fn drop(&mut self) {
        let f = self.plugin.raw.close.expect("checked at load");
        let _serial = self.lock();
        // SAFETY: the header's close, once, with the handle open returned.
        unsafe { f(self.handle) };
    }
}

/// Looks for the C entry point in `lib`.
pub fn entry(
    lib: &libloading::Library,
) -> Option<unsafe extern "C" fn(*const CHost) -> *const c_void> {
    // SAFETY: the symbol's type is the header's declaration of xen_disk_plugin_init.
    unsafe {
        lib.get::<unsafe extern "C" fn(*const CHost) -> *const c_void>(INIT_SYMBOL.as_bytes())
            .ok()
            .map(|s| *s)
    }
}
