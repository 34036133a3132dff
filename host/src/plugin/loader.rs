//! Loading a plugin `.so`: check it is one of ours and speaks our ABI, then describe it.
//!
//! Order of checks, each failure one line naming the file:
//! 0. it is a regular file (after symlinks), read through once: `dlopen` opens what it is
//!    given with a blocking `open(2)` while holding the dynamic loader's lock, so a FIFO
//!    named `libx.so` would hang it, and with it every thread that starts, ends or loads a
//!    library, for good;
//! 1. the file loads at all (`dlopen`);
//! 2. it exports `xen_disk_plugin_abi_version` (a Rust plugin) or `xen_disk_plugin_init` (a
//!    C plugin, [`super::c_plugin`]); else it is not a xen-disk plugin;
//! 3. its major version is ours (else: both versions named). A plugin of an older minor
//!    version loads: the 1.0 interface is frozen and what came later is asked for through
//!    extension calls it answers "unsupported". One of a newer minor loads too, and the
//!    host uses only what it knows (`plugins inspect` says so);
//! 4. for a Rust plugin, abi_stable's own version and type-layout check of the root module
//!    (the frozen 1.0 layout); for a C plugin, the checks of its struct.
//!
//! Libraries are never unloaded (abi_stable's rule): a loaded plugin's code stays mapped for
//! the life of the process, so disks opened from it stay valid.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use xen_disk_plugin_api::ffi::{PluginKind, PluginModRef};
use xen_disk_plugin_api::{
    abi_major, abi_minor, Config, ForeignDisk, KeyType, ABI_VERSION, ABI_VERSION_SYMBOL,
};

use super::c_plugin::{CPlugin, INIT_SYMBOL};

/// A packed ABI version as people write it: `1.0`, or `version 3 (before 1.0)` for the
/// numbering that came before.
pub fn version_text(v: u32) -> String {
    if abi_major(v) == 0 {
        format!("version {v} (before 1.0)")
    } else {
        format!("{}.{}", abi_major(v), abi_minor(v))
    }
}

/// Why a plugin could not be loaded or opened. Every variant displays as one line.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// Not found on the search path or at the given path.
    #[error(transparent)]
    NotFound(Box<super::search::SearchError>),
    /// `dlopen` failed.
    #[error("{path}: cannot load: {reason}")]
    Load { path: PathBuf, reason: String },
    /// The library has no xen-disk entry point.
    #[error("{path}: not a xen-disk plugin (no {ABI_VERSION_SYMBOL} or {INIT_SYMBOL} symbol)")]
    NotAPlugin { path: PathBuf },
    /// Built for another major version of the interface.
    #[error("{path}: built for plugin ABI {}; this host speaks ABI {} and loads plugins built for {}.0 to {}.{} (and newer {}.x)", version_text(*found), version_text(*expected), abi_major(*expected), abi_major(*expected), abi_minor(*expected), abi_major(*expected))]
    AbiVersion {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    /// A C plugin's struct was refused.
    #[error("{path}: C plugin refused: {reason}")]
    CPlugin { path: PathBuf, reason: String },
    /// abi_stable refused the root module (version or layout).
    #[error("{path}: incompatible plugin interface ({reason}); rebuild the plugin against this host's xen-disk-plugin-api")]
    Layout { path: PathBuf, reason: String },
    /// The plugin refused to open the disk.
    #[error("plugin {plugin}: {error}")]
    Open {
        plugin: String,
        error: xen_disk_plugin_api::Error,
    },
}

impl From<super::search::SearchError> for PluginError {
    fn from(e: super::search::SearchError) -> Self {
        PluginError::NotFound(Box::new(e))
    }
}

/// A declared configuration key, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// Key name.
    pub name: String,
    /// Value type.
    pub ty: KeyType,
    /// Default, as typed.
    pub default: Option<String>,
    /// Must be given.
    pub required: bool,
    /// Help line.
    pub help: String,
}

/// `config` with the defaults `keys` declare filled in where it does not set them, as the
/// plugin sees its table in `open`: for code outside the plugin that must use the same
/// settings (`bench`'s fair references).
pub fn with_declared_defaults(config: &Config, keys: &[KeyInfo]) -> Config {
    let mut table = config.table().clone();
    for k in keys {
        if let (false, Some(d)) = (table.contains_key(&k.name), &k.default) {
            table.insert(k.name.clone(), xen_disk_plugin_api::value_from_cli(d));
        }
    }
    Config::from_table(table)
}

/// A loaded plugin: its file, its root module and what it says about itself.
#[derive(Clone)]
pub struct LoadedPlugin {
    /// The file it was loaded from.
    pub path: PathBuf,
    /// Short name.
    pub name: String,
    /// Plugin version.
    pub version: String,
    /// One-line description.
    pub description: String,
    /// Declared configuration keys.
    pub keys: Vec<KeyInfo>,
    /// The ABI version it was built for (packed, [`xen_disk_plugin_api::abi_version`]).
    pub abi_version: u32,
    /// A disk, or a filter opened over a base disk.
    pub kind: PluginKind,
    /// A filter that never writes its base: the host opens the base read-only.
    pub read_only_base: bool,
    backend: Backend,
}

/// Which SDK the plugin was built with.
#[derive(Clone)]
enum Backend {
    Rust(PluginModRef),
    C(Arc<CPlugin>),
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("path", &self.path)
            .field("name", &self.name)
            .finish()
    }
}

/// Collapses abi_stable's multi-line messages into one line.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// abi_stable explains a layout mismatch with both types' full layouts (kilobytes); the
/// user needs its verdict, the text after the last `Error:`.
fn layout_reason(text: &str) -> String {
    let text = one_line(text);
    let verdict = text.rsplit("Error:").next().unwrap_or(&text).trim();
    let mut v: String = verdict.chars().take(160).collect();
    if v.len() < verdict.len() {
        v.push('…');
    }
    v
}

/// What a file is, for a refusal: `None` for a regular file.
fn not_regular(t: std::fs::FileType) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    Some(if t.is_file() {
        return None;
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "not a file"
    })
}

/// Refuses anything but a regular file, then reads it through once, before `dlopen` takes the
/// loader's lock. `stat` (following symlinks) decides without opening: opening a FIFO blocks,
/// opening a device may act. The open is non-blocking and checked again on the descriptor, in
/// case the file changed in between. Reading it through moves what a slow or hung filesystem
/// does to us out from under the lock, onto the caller's thread, and leaves the pages cached
/// for `dlopen` (a mitigation: nothing can make `dlopen` itself return early).
fn regular_file(path: &Path) -> Result<(), PluginError> {
    use std::os::unix::fs::OpenOptionsExt;
    let refuse = |reason: String| PluginError::Load {
        path: path.to_path_buf(),
        reason,
    };
    let what = |t| {
        not_regular(t).map_or(Ok(()), |kind| {
            Err(refuse(format!(
                "{kind}, not a regular file; a plugin is a shared library (.so) file"
            )))
        })
    };
    what(
        std::fs::metadata(path)
            .map_err(|e| refuse(e.to_string()))?
            .file_type(),
    )?;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| refuse(e.to_string()))?;
    what(
        file.metadata()
            .map_err(|e| refuse(e.to_string()))?
            .file_type(),
    )?;
    std::io::copy(&mut file, &mut std::io::sink()).map_err(|e| refuse(e.to_string()))?;
    Ok(())
}

/// Loads the plugin at `path`.
pub fn load(path: &Path) -> Result<LoadedPlugin, PluginError> {
    if !path.exists() {
        return Err(super::search::SearchError::NoSuchFile(path.display().to_string()).into());
    }
    regular_file(path)?;
    // dlopen needs a path with a slash to not search LD_LIBRARY_PATH.
    let path = if path.is_absolute() {
        path.to_path_buf()
    } else {
        Path::new(".").join(path)
    };
    // SAFETY: loading a library runs its initialisers; that is the point of a plugin and
    // the user chose the file. Nothing else is called before the checks below.
    let lib = unsafe { libloading::Library::new(&path) }.map_err(|e| PluginError::Load {
        path: path.clone(),
        reason: one_line(&e.to_string()),
    })?;
    // SAFETY: the symbol, if present, is `extern "C" fn() -> u32` by our ABI's definition;
    // a foreign library that happens to export the name with another type is the user's error.
    let found = unsafe {
        lib.get::<extern "C" fn() -> u32>(ABI_VERSION_SYMBOL.as_bytes())
            .ok()
            .map(|f| f())
    };
    let Some(found) = found else {
        return load_c(lib, path);
    };
    if abi_major(found) != abi_major(ABI_VERSION) {
        return Err(PluginError::AbiVersion {
            path,
            found,
            expected: ABI_VERSION,
        });
    }
    let header =
        abi_stable::library::lib_header_from_path(&path).map_err(|e| PluginError::Layout {
            path: path.clone(),
            reason: one_line(&e.to_string()),
        })?;
    let module = header
        .init_root_module::<PluginModRef>()
        .map_err(|e| PluginError::Layout {
            path: path.clone(),
            reason: layout_reason(&e.to_string()),
        })?;
    // The library stays loaded for the life of the process (abi_stable holds it too).
    std::mem::forget(lib);
    let d = (module.describe())();
    Ok(LoadedPlugin {
        kind: d.kind,
        name: d.name.to_string(),
        version: d.version.to_string(),
        description: d.description.to_string(),
        keys: d
            .config_keys
            .iter()
            .map(|k| KeyInfo {
                name: k.name.to_string(),
                ty: k.ty,
                default: k.default.map(|s| s.to_string()).into_option(),
                required: k.required,
                help: k.help.to_string(),
            })
            .collect(),
        abi_version: found,
        read_only_base: (module.read_only_base())(),
        path,
        backend: Backend::Rust(module),
    })
}

/// Loads a library with no Rust entry point: a C plugin, or not a plugin at all.
fn load_c(lib: libloading::Library, path: PathBuf) -> Result<LoadedPlugin, PluginError> {
    let Some(init) = super::c_plugin::entry(&lib) else {
        return Err(PluginError::NotAPlugin { path });
    };
    // The library is never unloaded: the plugin's struct and strings stay valid.
    std::mem::forget(lib);
    // SAFETY: `init` is this library's xen_disk_plugin_init, and it stays loaded.
    let c = unsafe { CPlugin::init(init) }.map_err(|reason| PluginError::CPlugin {
        path: path.clone(),
        reason,
    })?;
    Ok(LoadedPlugin {
        kind: PluginKind::Disk,
        name: c.name.to_string(),
        version: c.version.to_string(),
        description: c.description.to_string(),
        keys: c
            .keys
            .iter()
            .map(|k| KeyInfo {
                name: k.name.to_string(),
                ty: k.ty,
                default: k.default.map(str::to_string),
                required: k.required,
                help: k.help.to_string(),
            })
            .collect(),
        abi_version: c.api_version,
        read_only_base: false,
        path,
        backend: Backend::C(Arc::new(c)),
    })
}

/// Resolves a `--plugin` spec on the search path and loads it.
pub fn load_spec(spec: &str) -> Result<LoadedPlugin, PluginError> {
    let path = super::search::resolve(spec)?;
    load(&path)
}

impl LoadedPlugin {
    /// Opens a disk with `config`.
    pub fn open(&self, config: &Config) -> Result<ForeignDisk, PluginError> {
        match &self.backend {
            Backend::Rust(module) => ForeignDisk::open(*module, config),
            Backend::C(c) => c.open(config),
        }
        .map_err(|error| PluginError::Open {
            plugin: self.name.clone(),
            error,
        })
    }

    /// Written in C (`xen_disk_plugin_init`) rather than with the Rust SDK.
    pub fn is_c(&self) -> bool {
        matches!(self.backend, Backend::C(_))
    }

    /// The ABI version it was built for, and how this host serves it, for `plugins inspect`:
    /// `1.0`, or `1.3 (newer than this host's 1.1: what came after 1.1 is not used)`.
    pub fn abi_text(&self) -> String {
        let host = if self.is_c() {
            super::c_plugin::C_API_VERSION
        } else {
            ABI_VERSION
        };
        let sdk = if self.is_c() { " (C)" } else { "" };
        if abi_minor(self.abi_version) > abi_minor(host) {
            format!(
                "{}{sdk} (newer than this host's {}: what came after {} is not used)",
                version_text(self.abi_version),
                version_text(host),
                version_text(host)
            )
        } else {
            format!("{}{sdk}", version_text(self.abi_version))
        }
    }

    /// Opens a filter's disk over `base`.
    pub fn open_over(
        &self,
        config: &Config,
        base: ForeignDisk,
    ) -> Result<ForeignDisk, PluginError> {
        let Backend::Rust(module) = &self.backend else {
            return Err(PluginError::Open {
                plugin: self.name.clone(),
                error: xen_disk_plugin_api::Error::new(
                    xen_disk_plugin_api::ErrorKind::Config,
                    "this plugin is not a filter: it takes no base disk",
                ),
            });
        };
        ForeignDisk::open_over(*module, config, base).map_err(|error| PluginError::Open {
            plugin: self.name.clone(),
            error,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{layout_reason, load, version_text, with_declared_defaults, KeyInfo};
    use xen_disk_plugin_api::{Config, KeyType};

    #[test]
    fn declared_defaults_fill_what_the_configuration_leaves_out() {
        let key = |name: &str, ty, default: Option<&str>| KeyInfo {
            name: name.into(),
            ty,
            default: default.map(str::to_string),
            required: false,
            help: String::new(),
        };
        let keys = [
            key("io-timeout", KeyType::Integer, Some("60")),
            key("non-blocking-aio", KeyType::Bool, Some("false")),
            key("conf", KeyType::Path, None),
        ];
        let given = Config::from_pairs(&["non-blocking-aio=true", "image=x"]).unwrap();
        let full = with_declared_defaults(&given, &keys);
        assert_eq!(full.u64("io-timeout").unwrap(), 60);
        assert!(
            full.bool("non-blocking-aio").unwrap(),
            "a given value stays"
        );
        assert_eq!(full.str("image").unwrap(), "x");
        assert!(!full.contains("conf"), "no default, nothing filled");
    }

    #[test]
    fn versions_read_as_major_minor_and_the_old_numbering_says_so() {
        assert_eq!(version_text(xen_disk_plugin_api::abi_version(1, 0)), "1.0");
        assert_eq!(version_text(xen_disk_plugin_api::abi_version(2, 7)), "2.7");
        assert_eq!(version_text(3), "version 3 (before 1.0)");
    }
    use std::time::Duration;

    #[test]
    fn what_is_not_a_regular_file_is_refused_without_opening_it() {
        let dir = std::env::temp_dir().join(format!("xen-disk-loader-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("libfifo.so");
        let _ = std::fs::remove_file(&fifo);
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: `c` is a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let link = dir.join("liblink.so");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&fifo, &link).unwrap();
        let sub = dir.join("libdir.so");
        std::fs::create_dir_all(&sub).unwrap();
        // Opening the FIFO would block for good: the loads run on a thread, bounded.
        let (tx, rx) = std::sync::mpsc::channel();
        let paths = [fifo.clone(), link.clone(), sub.clone()];
        std::thread::spawn(move || {
            let _ = tx.send(paths.map(|p| load(&p).unwrap_err().to_string()));
        });
        let [f, l, d] = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("load blocked on a FIFO");
        assert!(
            f.contains("libfifo.so") && f.contains("a FIFO, not a regular file"),
            "{f}"
        );
        assert!(
            l.contains("liblink.so") && l.contains("a FIFO, not a regular file"),
            "{l}"
        );
        assert!(d.contains("libdir.so") && d.contains("a directory"), "{d}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_layout_mismatch_is_reported_by_its_verdict() {
        let long = format!(
            "Compared <this>: {} Error:too many fields\n Expected: 5 Found: 4",
            "x ".repeat(5000)
        );
        assert_eq!(layout_reason(&long), "too many fields Expected: 5 Found: 4");
        assert!(layout_reason(&"y".repeat(1000)).chars().count() <= 161);
    }
}
