//! Building a stack of layers: a filter plugin over a base, which may itself be a filter.
//!
//! The filter's configuration carries its base as a table: `-c base=vhd -c base.path=g.vhd`
//! (or `[plugin-config.base]` with `plugin = "vhd"` in TOML). The host opens the base first,
//! bottom up, then the filter over it; each layer sees the one below as a plain disk.
//!
//! A filter that declares [`Filter::READ_ONLY_BASE`](xen_disk_plugin_api::Filter) (cow) gets
//! its whole base stack opened read-only: each plain plugin below gets `readonly=true` (or
//! `shared=false` for a plugin whose only such key is `shared`, like mmap) so it opens its
//! file read-only and cannot touch it on open; a plugin with neither key is wrapped so that
//! writes fail before they reach it. A user's explicit `readonly=false` is refused.
//!
//! A command that only reads (`sim read`) opens its stack with [`open_stack_read_only`]: each
//! plain plugin gets the same switch, unless the user set the key, so that an image the host
//! may not write (mode 0444, immutable, a read-only mount) still opens.

use super::loader::KeyInfo;
use super::loader::{load_spec, LoadedPlugin, PluginError};
use xen_disk_plugin_api::ffi::PluginKind;
use xen_disk_plugin_api::{
    export_disk, Config, Disk, DiskInfo, Error, ErrorKind, ForeignDisk, ReadBufs, Result, WriteBufs,
};

/// How deep stacks may go (a loop in a config file is not possible, but a silly one is).
pub const MAX_LAYERS: usize = 8;

/// An opened stack: the top disk and the plugins it is made of, top first.
pub struct Stack {
    /// The disk the guest is served from.
    pub disk: ForeignDisk,
    /// Every layer's plugin, top first.
    pub layers: Vec<LoadedPlugin>,
}

impl Stack {
    /// "cow over vhd" style description.
    pub fn describe(&self) -> String {
        self.layers
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(" over ")
    }
}

fn bad(plugin: &str, message: String) -> PluginError {
    PluginError::Open {
        plugin: plugin.to_string(),
        error: xen_disk_plugin_api::Error::new(xen_disk_plugin_api::ErrorKind::Config, message),
    }
}

/// How a layer is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Access {
    /// As its configuration says.
    AsConfigured,
    /// Read-only unless the user set the plugin's switch: the caller only reads.
    ReadOnlyUnlessSet,
    /// Read-only, always: the base of a filter that never writes it.
    ReadOnly,
}

/// Loads `spec` and opens it with `config`, building its base stack first if it is a filter.
pub fn open_stack(spec: &str, config: &Config) -> Result<Stack, PluginError> {
    open_layer(spec, config.clone(), 0, Access::AsConfigured)
}

/// As [`open_stack`], for a caller that never writes: each plain plugin that has a read-only
/// switch (`readonly`, or `shared` for mmap) gets it set, unless the user set it. Writes are
/// the caller's to refuse (a read-only [`GuardedDisk`](super::GuardedDisk)).
pub fn open_stack_read_only(spec: &str, config: &Config) -> Result<Stack, PluginError> {
    open_layer(spec, config.clone(), 0, Access::ReadOnlyUnlessSet)
}

fn has_bool_key(keys: &[KeyInfo], name: &str) -> bool {
    keys.iter()
        .any(|k| k.name == name && k.ty == xen_disk_plugin_api::KeyType::Bool)
}

/// Sets the plain plugin's own read-only switch: refusing a user's contrary choice under
/// [`Access::ReadOnly`], keeping it under [`Access::ReadOnlyUnlessSet`]. Returns false when
/// the plugin has no such key.
fn force_read_only(
    plugin: &LoadedPlugin,
    config: &mut Config,
    access: Access,
) -> std::result::Result<bool, PluginError> {
    let (key, wanted) = if has_bool_key(&plugin.keys, "readonly") {
        ("readonly", true)
    } else if has_bool_key(&plugin.keys, "shared") {
        ("shared", false)
    } else {
        return Ok(false);
    };
    if let Some(v) = config.value(key) {
        if access == Access::ReadOnlyUnlessSet {
            return Ok(true);
        }
        if v.as_bool() != Some(wanted) {
            return Err(bad(
                &plugin.name,
                format!(
                    "config key `{key}`: the base of a copy-on-write filter is always opened \
                     read-only; drop `{key}={v}`"
                ),
            ));
        }
    }
    config
        .set(key, toml::Value::Boolean(wanted))
        .map_err(|e| bad(&plugin.name, e))?;
    Ok(true)
}

/// A base with no read-only switch of its own: writes stop here.
struct ReadOnlyBase(ForeignDisk);

impl Disk for ReadOnlyBase {
    fn info(&self) -> DiskInfo {
        let i = self.0.info();
        DiskInfo {
            read_only: true,
            can_discard: false,
            can_write_zeroes: false,
            can_fua: false,
            ..i
        }
    }
    fn read(&self, offset: u64, bufs: &mut ReadBufs<'_>) -> Result<()> {
        self.0.read(offset, bufs)
    }
    fn write(&self, _: u64, _: &WriteBufs<'_>) -> Result<()> {
        Err(Error::new(
            ErrorKind::ReadOnly,
            "the base of a copy-on-write filter is read-only",
        ))
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

fn open_layer(
    spec: &str,
    mut config: Config,
    depth: usize,
    access: Access,
) -> Result<Stack, PluginError> {
    if depth >= MAX_LAYERS {
        return Err(bad(spec, format!("more than {MAX_LAYERS} layers")));
    }
    let plugin = load_spec(spec)?;
    let base = config.take("base");
    match (plugin.kind, base) {
        (PluginKind::Disk, None) => {
            let switched =
                access != Access::AsConfigured && force_read_only(&plugin, &mut config, access)?;
            let mut disk = plugin.open(&config)?;
            if access == Access::ReadOnly && !switched {
                disk = ForeignDisk::new(export_disk(ReadOnlyBase(disk)));
            }
            Ok(Stack {
                disk,
                layers: vec![plugin],
            })
        }
        (PluginKind::Disk, Some(_)) => Err(bad(
            &plugin.name,
            "config key `base`: this plugin is not a filter, it takes no base disk".into(),
        )),
        (PluginKind::Filter, None) => Err(bad(
            &plugin.name,
            "is a filter: give it a base disk, e.g. -c base=file -c base.path=IMG".into(),
        )),
        (PluginKind::Filter, Some(base)) => {
            let (base_spec, base_config) = match base {
                toml::Value::String(name) => (name, Config::new()),
                toml::Value::Table(mut t) => match t.remove("plugin") {
                    Some(toml::Value::String(name)) => (name, Config::from_table(t)),
                    _ => {
                        return Err(bad(
                            &plugin.name,
                            "config key `base`: name the base plugin (base=NAME)".into(),
                        ))
                    }
                },
                other => {
                    return Err(bad(
                        &plugin.name,
                        format!("config key `base`: expected a plugin name or table, got {other}"),
                    ))
                }
            };
            let below_access = if plugin.read_only_base {
                Access::ReadOnly
            } else {
                access
            };
            let below = open_layer(&base_spec, base_config, depth + 1, below_access)?;
            let disk = plugin.open_over(&config, below.disk)?;
            let mut layers = vec![plugin];
            layers.extend(below.layers);
            Ok(Stack { disk, layers })
        }
    }
}
