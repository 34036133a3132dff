//! The toolstack's `params` key: which plugin serves a device the toolstack created.
//!
//! libxl writes `params` = `<format>:<path>` for `backendtype=tap` (backend type `vbd3`).
//! We map the format to a plugin: `aio` and `raw` → `file`, `vhd` → `vhd`, `qcow2` → `qcow2`,
//! and any other word names a plugin directly (`mmap:/images/a.img`). A bare path is served
//! by `file`. Extra plugin keys may follow as `,key=value` pairs after the path. libxl
//! itself only writes `aio:` and `vhd:`; a path in the descriptor directory is read by
//! [`super::descriptor`] instead.

/// A plugin name and its configuration pairs, from `params`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginSpec {
    /// Plugin name or path.
    pub plugin: String,
    /// `key=value` pairs, `path=…` first.
    pub pairs: Vec<String>,
}

/// What is wrong with a `params` value (quoted in the message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamsError {
    /// Nothing but blanks.
    #[error("params is empty")]
    Empty,
    /// `format:` and nothing after it.
    #[error("params `{params}` names no image path")]
    NoPath {
        /// The value.
        params: String,
    },
    /// The format word has characters a plugin name cannot have.
    #[error("params `{params}`: `{plugin}` is not a plugin name")]
    BadPlugin {
        /// The value.
        params: String,
        /// The format word, mapped.
        plugin: String,
    },
    /// An extra after the path without `=`.
    #[error("params `{params}`: `{extra}` is not key=value")]
    NotKeyValue {
        /// The value.
        params: String,
        /// The extra.
        extra: String,
    },
}

/// Parses a `params` value.
pub fn parse_params(params: &str) -> Result<PluginSpec, ParamsError> {
    let params = params.trim();
    if params.is_empty() {
        return Err(ParamsError::Empty);
    }
    let (format, rest) = match params.split_once(':') {
        Some((f, r)) if !f.contains('/') && !f.is_empty() => (f, r),
        _ => ("raw", params),
    };
    let mut parts = rest.split(',');
    let path = parts.next().unwrap_or_default();
    if path.is_empty() {
        return Err(ParamsError::NoPath {
            params: params.to_string(),
        });
    }
    let plugin = match format {
        "aio" | "raw" => "file",
        other => other,
    };
    if !plugin
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(ParamsError::BadPlugin {
            params: params.to_string(),
            plugin: plugin.to_string(),
        });
    }
    let mut pairs = vec![format!("path={path}")];
    for extra in parts {
        if !extra.contains('=') {
            return Err(ParamsError::NotKeyValue {
                params: params.to_string(),
                extra: extra.to_string(),
            });
        }
        pairs.push(extra.to_string());
    }
    Ok(PluginSpec {
        plugin: plugin.to_string(),
        pairs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_map_to_plugins() {
        let p = parse_params("aio:/images/a.img").unwrap();
        assert_eq!(
            (p.plugin.as_str(), p.pairs.as_slice()),
            ("file", &["path=/images/a.img".to_string()][..])
        );
        assert_eq!(parse_params("vhd:/x.vhd").unwrap().plugin, "vhd");
        assert_eq!(parse_params("/plain.img").unwrap().plugin, "file");
        let p = parse_params("mmap:/a.img,shared=false").unwrap();
        assert_eq!(p.plugin, "mmap");
        assert_eq!(
            p.pairs,
            vec!["path=/a.img".to_string(), "shared=false".to_string()]
        );
        assert_eq!(parse_params(" "), Err(ParamsError::Empty));
        for (bad, message) in [
            ("vhd:", "params `vhd:` names no image path"),
            (
                "mmap:/a,oops",
                "params `mmap:/a,oops`: `oops` is not key=value",
            ),
            ("a b:/x", "params `a b:/x`: `a b` is not a plugin name"),
        ] {
            assert_eq!(parse_params(bad).unwrap_err().to_string(), message, "{bad}");
        }
    }
}
