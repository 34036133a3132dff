//! Building a stack of layers: a filter plugin over a base, which may itself be a filter.
//!
//! The filter's configuration carries its base as a table: `-c base=vhd -c base.path=g.vhd`
//! (or `[plugin-config.base]` with `plugin = "vhd"` in TOML). The host opens the base first,
//! bottom up, then the filter over it; each layer sees the one below as a plain disk.

use super::loader::{load_spec, LoadedPlugin, PluginError};
use xen_disk_plugin_api::ffi::PluginKind;
use xen_disk_plugin_api::{Config, ForeignDisk};

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

/// Loads `spec` and opens it with `config`, building its base stack first if it is a filter.
pub fn open_stack(spec: &str, config: &Config) -> Result<Stack, PluginError> {
    open_layer(spec, config.clone(), 0)
}

fn open_layer(spec: &str, mut config: Config, depth: usize) -> Result<Stack, PluginError> {
    if depth >= MAX_LAYERS {
        return Err(bad(spec, format!("more than {MAX_LAYERS} layers")));
    }
    let plugin = load_spec(spec)?;
    let base = config.take("base");
    match (plugin.kind, base) {
        (PluginKind::Disk, None) => {
            let disk = plugin.open(&config)?;
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
            let below = open_layer(&base_spec, base_config, depth + 1)?;
            let disk = plugin.open_over(&config, below.disk)?;
            let mut layers = vec![plugin];
            layers.extend(below.layers);
            Ok(Stack { disk, layers })
        }
    }
}
