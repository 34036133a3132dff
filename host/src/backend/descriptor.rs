//! Disk descriptors: how an `xl` disk spec reaches any plugin stack.
//!
//! libxl accepts only `format=raw` or `format=vhd` for `backendtype=tap` and writes `params`
//! = `aio:<target>` or `vhd:<target>`; it never opens the target itself. A target inside the
//! descriptor directory (default [`DEFAULT_DIR`]) names a small TOML file the administrator
//! wrote, which says what serves the disk:
//!
//! ```toml
//! # /etc/xen-disk/xl/web1.toml, used as target=/etc/xen-disk/xl/web1.toml with format=raw
//! plugin = "qcow2"
//! readonly = false          # optional
//! [plugin-config]
//! path = "/srv/web1.qcow2"
//! ```
//!
//! The plugin always comes from a file only dom0's administrator writes, never from an
//! image's contents: a guest that writes a qcow2 header into a raw disk is still served raw
//! the next time (`aio:` is `file`, whatever the bytes say).

use super::params::{parse_params, ParamsError};
use std::path::{Path, PathBuf};
use xen_disk_plugin_api::Config;

/// Where descriptors live unless `serve --descriptors` says otherwise.
pub const DEFAULT_DIR: &str = "/etc/xen-disk/xl";

/// A plugin, its configuration and whether the disk is read-only, from `params`.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// Plugin name.
    pub plugin: String,
    /// Its configuration.
    pub config: Config,
    /// The descriptor asks for a read-only disk.
    pub readonly: bool,
    /// The descriptor it came from, if any (for messages).
    pub descriptor: Option<PathBuf>,
}

/// What is wrong with `params` or the descriptor it names (the file is named).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DescriptorError {
    /// `params` itself.
    #[error(transparent)]
    Params(#[from] ParamsError),
    /// The `,key=value` extras do not make a configuration.
    #[error("`params`: {0}")]
    PluginConfig(String),
    /// A descriptor named with a format other than raw.
    #[error("{path}: a descriptor is named with format=raw (params `aio:`), not `{format}:`")]
    Format {
        /// The descriptor.
        path: String,
        /// The format word given.
        format: String,
    },
    /// A descriptor path that leaves the directory or names a subdirectory.
    #[error("{path}: not a file directly in {dir}")]
    Outside {
        /// As given.
        path: String,
        /// The descriptor directory.
        dir: String,
    },
    /// Reading the file.
    #[error("{path}: {message}")]
    Read {
        /// The descriptor.
        path: String,
        /// Why.
        message: String,
    },
    /// The file's contents.
    #[error("{path}: {message}")]
    Invalid {
        /// The descriptor.
        path: String,
        /// What is wrong, naming the key.
        message: String,
    },
}

/// What serves a toolstack device whose `params` is `params`: a descriptor in `dir` when the
/// path is there, else the plugin `params` names (see [`super::params`]).
pub fn resolve(params: &str, dir: &Path) -> Result<Resolved, DescriptorError> {
    let spec = parse_params(params)?;
    let path = spec.pairs[0].strip_prefix("path=").unwrap_or_default();
    let in_dir = Path::new(path).starts_with(dir);
    if !in_dir {
        let config = Config::from_pairs(&spec.pairs).map_err(DescriptorError::PluginConfig)?;
        return Ok(Resolved {
            plugin: spec.plugin,
            config,
            readonly: false,
            descriptor: None,
        });
    }
    let format = params
        .trim()
        .split_once(':')
        .map(|(f, _)| f)
        .unwrap_or("raw");
    if spec.plugin != "file" || spec.pairs.len() > 1 {
        return Err(DescriptorError::Format {
            path: path.to_string(),
            format: format.to_string(),
        });
    }
    // Only a plain file name directly inside the directory: no `..`, no subdirectories.
    let rest = Path::new(path).strip_prefix(dir).unwrap_or(Path::new(""));
    let plain = rest.components().count() == 1
        && matches!(
            rest.components().next(),
            Some(std::path::Component::Normal(_))
        );
    if !plain || path.ends_with('/') {
        return Err(DescriptorError::Outside {
            path: path.to_string(),
            dir: dir.display().to_string(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(|e| DescriptorError::Read {
        path: path.to_string(),
        message: e.to_string(),
    })?;
    parse_descriptor(Path::new(path), &text)
}

/// Parses a descriptor's text (`path` for messages).
pub fn parse_descriptor(path: &Path, text: &str) -> Result<Resolved, DescriptorError> {
    let invalid = |message: String| DescriptorError::Invalid {
        path: path.display().to_string(),
        message,
    };
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| invalid(e.message().to_string()))?;
    for key in table.keys() {
        if !["plugin", "readonly", "plugin-config"].contains(&key.as_str()) {
            return Err(invalid(format!(
                "unknown key `{key}` (expected plugin, readonly, plugin-config)"
            )));
        }
    }
    let plugin = match table.get("plugin") {
        Some(toml::Value::String(p)) => p.clone(),
        Some(_) => return Err(invalid("`plugin` must be a string".into())),
        None => return Err(invalid("`plugin` is missing".into())),
    };
    let plain = !plugin.is_empty()
        && plugin
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !plain {
        return Err(invalid(format!(
            "`plugin`: `{plugin}` is not a plugin name"
        )));
    }
    let readonly = match table.get("readonly") {
        None => false,
        Some(toml::Value::Boolean(b)) => *b,
        Some(_) => return Err(invalid("`readonly` must be true or false".into())),
    };
    let config = match table.get("plugin-config") {
        None => Config::new(),
        Some(toml::Value::Table(t)) => Config::from_table(t.clone()),
        Some(_) => return Err(invalid("`plugin-config` must be a table".into())),
    };
    Ok(Resolved {
        plugin,
        config,
        readonly,
        descriptor: Some(path.to_path_buf()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> (PathBuf, Scratch) {
        let s = Scratch::new();
        (s.0.clone(), s)
    }

    /// A scratch directory removed on drop.
    struct Scratch(PathBuf);
    impl Scratch {
        fn new() -> Self {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "xen-disk-descriptor-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            std::fs::create_dir_all(&p).unwrap();
            Scratch(p)
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn get(r: &Resolved, key: &str) -> Option<String> {
        r.config.table().get(key).map(|v| match v {
            toml::Value::String(s) => s.clone(),
            other => other.to_string(),
        })
    }

    #[test]
    fn formats_outside_the_directory_map_as_params_says() {
        let (d, _s) = dir();
        let r = resolve("aio:/srv/a.img", &d).unwrap();
        assert_eq!((r.plugin.as_str(), r.readonly), ("file", false));
        assert_eq!(get(&r, "path").as_deref(), Some("/srv/a.img"));
        assert_eq!(resolve("vhd:/srv/a.vhd", &d).unwrap().plugin, "vhd");
        assert!(resolve("aio:/srv/a.img", &d).unwrap().descriptor.is_none());
    }

    #[test]
    fn every_plugin_is_reachable_through_a_descriptor() {
        let (d, _s) = dir();
        let files = [
            (
                "q.toml",
                "plugin = \"qcow2\"\n[plugin-config]\npath = \"/srv/q.qcow2\"\n",
                "qcow2",
                "path",
                "/srv/q.qcow2",
            ),
            (
                "c.toml",
                "plugin = \"cow\"\n[plugin-config]\noverlay = \"/var/lib/a.cow\"\n[plugin-config.base]\nplugin = \"file\"\npath = \"/srv/gold.img\"\n",
                "cow",
                "overlay",
                "/var/lib/a.cow",
            ),
            (
                "rbd",
                "plugin = \"ceph-rbd\"\n[plugin-config]\npool = \"rbd\"\nimage = \"vm1\"\nconf = \"/etc/ceph/ceph.conf\"\n",
                "ceph-rbd",
                "image",
                "vm1",
            ),
            (
                "nbd.toml",
                "plugin = \"nbd-client\"\nreadonly = true\n[plugin-config]\nuri = \"nbd+unix:///?socket=/run/nbd.sock\"\n",
                "nbd-client",
                "uri",
                "nbd+unix:///?socket=/run/nbd.sock",
            ),
        ];
        for (name, text, plugin, key, value) in files {
            std::fs::write(d.join(name), text).unwrap();
            let params = format!("aio:{}", d.join(name).display());
            let r = resolve(&params, &d).unwrap();
            assert_eq!(r.plugin, plugin, "{name}");
            assert_eq!(get(&r, key).as_deref(), Some(value), "{name}");
            assert_eq!(r.readonly, name == "nbd.toml", "{name}");
            assert_eq!(r.descriptor.as_deref(), Some(d.join(name).as_path()));
        }
    }

    #[test]
    fn bad_descriptors_and_paths_are_named() {
        let (d, _s) = dir();
        let ds = d.display();
        std::fs::create_dir(d.join("sub")).unwrap();
        std::fs::write(d.join("sub/x.toml"), "plugin = \"file\"\n").unwrap();
        let cases: Vec<(String, String)> = vec![
            (
                format!("vhd:{ds}/x.toml"),
                format!("{ds}/x.toml: a descriptor is named with format=raw (params `aio:`), not `vhd:`"),
            ),
            (
                format!("aio:{ds}/x.toml,shared=false"),
                format!("{ds}/x.toml: a descriptor is named with format=raw (params `aio:`), not `aio:`"),
            ),
            (format!("aio:{ds}/sub/x.toml"), format!("{ds}/sub/x.toml: not a file directly in {ds}")),
            (format!("aio:{ds}/../etc.toml"), format!("{ds}/../etc.toml: not a file directly in {ds}")),
            (format!("aio:{ds}/"), format!("{ds}/: not a file directly in {ds}")),
        ];
        for (params, message) in cases {
            assert_eq!(
                resolve(&params, &d).unwrap_err().to_string(),
                message,
                "{params}"
            );
        }
        let missing = resolve(&format!("aio:{ds}/none.toml"), &d)
            .unwrap_err()
            .to_string();
        assert!(
            missing.starts_with(&format!("{ds}/none.toml: ")),
            "{missing}"
        );
        let p = Path::new("/etc/xen-disk/xl/a.toml");
        for (text, message) in [
            ("", "`plugin` is missing"),
            ("plugin = 3", "`plugin` must be a string"),
            (
                "plugin = \"../evil\"",
                "`plugin`: `../evil` is not a plugin name",
            ),
            (
                "plugin = \"/lib/x.so\"",
                "`plugin`: `/lib/x.so` is not a plugin name",
            ),
            (
                "plugin = \"file\"\nformat = \"qcow2\"",
                "unknown key `format` (expected plugin, readonly, plugin-config)",
            ),
            (
                "plugin = \"file\"\nreadonly = \"yes\"",
                "`readonly` must be true or false",
            ),
            (
                "plugin = \"file\"\nplugin-config = 1",
                "`plugin-config` must be a table",
            ),
        ] {
            assert_eq!(
                parse_descriptor(p, text).unwrap_err().to_string(),
                format!("/etc/xen-disk/xl/a.toml: {message}"),
                "{text}"
            );
        }
        assert!(parse_descriptor(p, "plugin = ")
            .unwrap_err()
            .to_string()
            .starts_with("/etc/xen-disk/xl/a.toml: "));
    }
}
