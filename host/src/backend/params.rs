//! The toolstack's `params` key: which plugin serves a device the toolstack created.
//!
//! libxl writes `params` = `<format>:<path>` for `backendtype=tap` (backend type `vbd3`).
//! We map the format to a plugin: `aio` and `raw` → `file`, `vhd` → `vhd`, `qcow2` → `qcow2`,
//! and any other word names a plugin directly (`mmap:/images/a.img`). A bare path is served
//! by `file`. Extra plugin keys may follow as `,key=value` pairs after the path.

/// A plugin name and its configuration pairs, from `params`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginSpec {
    /// Plugin name or path.
    pub plugin: String,
    /// `key=value` pairs, `path=…` first.
    pub pairs: Vec<String>,
}

/// Parses a `params` value.
pub fn parse_params(params: &str) -> Result<PluginSpec, String> {
    let params = params.trim();
    if params.is_empty() {
        return Err("params is empty".into());
    }
    let (format, rest) = match params.split_once(':') {
        Some((f, r)) if !f.contains('/') && !f.is_empty() => (f, r),
        _ => ("raw", params),
    };
    let mut parts = rest.split(',');
    let path = parts.next().unwrap_or_default();
    if path.is_empty() {
        return Err(format!("params `{params}` names no image path"));
    }
    let plugin = match format {
        "aio" | "raw" => "file",
        other => other,
    };
    if !plugin
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!(
            "params `{params}`: `{plugin}` is not a plugin name"
        ));
    }
    let mut pairs = vec![format!("path={path}")];
    for extra in parts {
        if !extra.contains('=') {
            return Err(format!("params `{params}`: `{extra}` is not key=value"));
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
        for bad in ["", "vhd:", "mmap:/a,oops", "a b:/x"] {
            assert!(parse_params(bad).is_err(), "{bad}");
        }
    }
}
