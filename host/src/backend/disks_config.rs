//! `serve --config disks.toml`: the statically configured disks.
//!
//! ```toml
//! [[disk]]
//! domain = "guest1"            # domid, name or UUID
//! plugin = "mmap"              # a name on the plugin search path, or a path to a .so
//! readonly = false             # optional
//! sector-size = 4096           # optional: present 4096-byte logical sectors
//! queues = 2                   # optional: at most this many rings
//! vbd = "xvdb"                 # optional: guest device (default: the next free one)
//! answer-on-completion = false # optional: as `serve --answer-on-completion=false`, for this disk
//! [disk.plugin-config]         # the same table `-c key=value` builds
//! path = "/images/gold.img"
//! shared = false
//! ```
//!
//! Every mistake is one line naming the file, the disk (by position) and the key.

use super::vbd::Vbd;
use std::path::Path;
use xen_disk_plugin_api::Config;

/// How a disk names its guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainRef {
    /// A domain id.
    Id(u32),
    /// A VM UUID.
    Uuid(String),
    /// A VM name.
    Name(String),
}

impl DomainRef {
    /// Reads a domain as users write it: digits are an id, 8-4-4-4-12 hex a UUID, else a name.
    pub fn parse(text: &str) -> Result<DomainRef, String> {
        let t = text.trim();
        if t.is_empty() {
            return Err("empty domain".into());
        }
        if t.bytes().all(|b| b.is_ascii_digit()) {
            return t
                .parse::<u32>()
                .ok()
                .filter(|&d| d < 0x7ff0)
                .map(DomainRef::Id)
                .ok_or_else(|| format!("domain id {t} is out of range"));
        }
        let groups: Vec<&str> = t.split('-').collect();
        let is_uuid = groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
            && groups
                .iter()
                .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()));
        Ok(if is_uuid {
            DomainRef::Uuid(t.to_ascii_lowercase())
        } else {
            DomainRef::Name(t.to_string())
        })
    }
}

impl std::fmt::Display for DomainRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DomainRef::Id(id) => write!(f, "{id}"),
            DomainRef::Uuid(u) | DomainRef::Name(u) => f.write_str(u),
        }
    }
}

/// One configured disk.
#[derive(Debug, Clone, PartialEq)]
pub struct DiskSpec {
    /// The guest.
    pub domain: DomainRef,
    /// Plugin name or path.
    pub plugin: String,
    /// Serve read-only.
    pub readonly: bool,
    /// Logical sector size to present (512 or 4096), if not the plugin's.
    pub sector_size: Option<u32>,
    /// Most rings to offer.
    pub queues: Option<u32>,
    /// Guest device, if fixed.
    pub vbd: Option<Vbd>,
    /// Whether completing threads answer the guest (`serve --answer-on-completion`, on by
    /// default, if unset).
    pub answer_on_completion: Option<bool>,
    /// The plugin's configuration.
    pub plugin_config: Config,
}

const DISK_KEYS: &[&str] = &[
    "domain",
    "plugin",
    "readonly",
    "sector-size",
    "queues",
    "vbd",
    "answer-on-completion",
    "plugin-config",
];

/// Parses a disks file's text; `file` names it in errors.
pub fn parse_disks(file: &Path, text: &str) -> Result<Vec<DiskSpec>, String> {
    let f = file.display();
    let doc = parse_toml(file, text)?;
    for key in doc.keys() {
        if key != "disk" {
            return Err(format!(
                "{f}: unknown top-level key `{key}` (expected [[disk]] tables)"
            ));
        }
    }
    let disks = match doc.get("disk") {
        None => return Err(format!("{f}: no [[disk]] entries")),
        Some(toml::Value::Array(a)) => a,
        Some(_) => return Err(format!("{f}: `disk` must be an array of tables ([[disk]])")),
    };
    let specs = disks
        .iter()
        .enumerate()
        .map(|(i, d)| parse_disk(&format!("{f}: disk {}", i + 1), d))
        .collect::<Result<Vec<_>, _>>()?;
    // Two entries for one guest device can never both be served: refused here, once, rather
    // than the second failing to attach round after round.
    for (j, b) in specs.iter().enumerate() {
        if let Some(i) = specs[..j]
            .iter()
            .position(|a| a.vbd.is_some() && a.vbd == b.vbd && a.domain == b.domain)
        {
            return Err(format!(
                "{f}: disks {} and {} both give domain {} the device {}",
                i + 1,
                j + 1,
                b.domain,
                b.vbd.map(Vbd::linux_name).unwrap_or_default()
            ));
        }
    }
    Ok(specs)
}

/// Parses TOML text; a syntax error names the file, line and column.
pub fn parse_toml(file: &Path, text: &str) -> Result<toml::Table, String> {
    text.parse().map_err(|e: toml::de::Error| {
        let at = e
            .span()
            .map(|span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |n| n + 1) + 1;
                format!(":{line}:{column}")
            })
            .unwrap_or_default();
        format!(
            "{}{at}: not valid TOML: {}",
            file.display(),
            e.message().trim()
        )
    })
}

fn parse_disk(at: &str, value: &toml::Value) -> Result<DiskSpec, String> {
    let t = value
        .as_table()
        .ok_or_else(|| format!("{at}: not a table"))?;
    for key in t.keys() {
        if !DISK_KEYS.contains(&key.as_str()) {
            return Err(format!(
                "{at}: unknown key `{key}` (known: {})",
                DISK_KEYS.join(", ")
            ));
        }
    }
    let string = |k: &str| -> Result<Option<&str>, String> {
        match t.get(k) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(format!("{at}: `{k}` must be a string, not {v}")),
        }
    };
    let number = |k: &str| -> Result<Option<u32>, String> {
        match t.get(k) {
            None => Ok(None),
            Some(toml::Value::Integer(n)) => u32::try_from(*n)
                .map(Some)
                .map_err(|_| format!("{at}: `{k}` = {n} is out of range")),
            Some(v) => Err(format!("{at}: `{k}` must be a number, not {v}")),
        }
    };
    let domain = match t.get("domain") {
        Some(toml::Value::Integer(n)) => DomainRef::parse(&n.to_string()),
        Some(toml::Value::String(s)) => DomainRef::parse(s),
        Some(v) => Err(format!("must be a domid, name or UUID, not {v}")),
        None => Err("is required".into()),
    }
    .map_err(|e| format!("{at}: `domain` {e}"))?;
    let plugin = string("plugin")?
        .ok_or_else(|| format!("{at}: `plugin` is required"))?
        .to_string();
    let boolean = |k: &str| -> Result<Option<bool>, String> {
        match t.get(k) {
            None => Ok(None),
            Some(toml::Value::Boolean(b)) => Ok(Some(*b)),
            Some(v) => Err(format!("{at}: `{k}` must be true or false, not {v}")),
        }
    };
    let readonly = boolean("readonly")?.unwrap_or(false);
    let answer_on_completion = boolean("answer-on-completion")?;
    let sector_size = number("sector-size")?;
    if let Some(s) = sector_size.filter(|s| *s != 512 && *s != 4096) {
        return Err(format!("{at}: `sector-size` = {s} (must be 512 or 4096)"));
    }
    let queues = number("queues")?;
    if let Some(q) = queues.filter(|q| *q == 0 || *q > 64) {
        return Err(format!("{at}: `queues` = {q} (must be 1 to 64)"));
    }
    let vbd = string("vbd")?
        .map(|v| {
            Vbd::parse(v).ok_or_else(|| format!("{at}: `vbd` = `{v}` is not a device like xvdb"))
        })
        .transpose()?;
    let plugin_config = match t.get("plugin-config") {
        None => Config::new(),
        Some(toml::Value::Table(c)) => Config::from_table(c.clone()),
        Some(v) => return Err(format!("{at}: `plugin-config` must be a table, not {v}")),
    };
    Ok(DiskSpec {
        domain,
        plugin,
        readonly,
        sector_size,
        queues,
        vbd,
        answer_on_completion,
        plugin_config,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<DiskSpec>, String> {
        parse_disks(Path::new("disks.toml"), text)
    }

    #[test]
    fn the_documented_example_parses() {
        let d = parse(
            "[[disk]]\ndomain = \"guest1\"\nplugin = \"mmap\"\nreadonly = true\nsector-size = 4096\nvbd = \"xvdc\"\n\
             [disk.plugin-config]\npath = \"/images/gold.img\"\nshared = false\n\
             [[disk]]\ndomain = 7\nplugin = \"discard\"\nanswer-on-completion = true\n",
        )
        .unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].domain, DomainRef::Name("guest1".into()));
        assert_eq!(
            (d[0].readonly, d[0].sector_size, d[0].vbd),
            (true, Some(4096), Some(Vbd::disk(2)))
        );
        assert_eq!(d[0].plugin_config.str("path").unwrap(), "/images/gold.img");
        assert_eq!(d[1].domain, DomainRef::Id(7));
        assert_eq!(
            (d[0].answer_on_completion, d[1].answer_on_completion),
            (None, Some(true))
        );
        assert!(d[1].plugin_config.table().is_empty());
    }

    #[test]
    fn mistakes_name_file_disk_and_key() {
        let cases = [
            ("[[disk]\n", "disks.toml:1:7: not valid TOML"),
            (
                "[[disk]]\ndomain = 1\nplugin = \"m\"\nreadonly = yes\n",
                "disks.toml:4:12: not valid TOML",
            ),
            (
                "[[disk]]\ndomain = \"g\"\nplugin = \"m\"\nvbd = \"xvdb\"\n\
                 [[disk]]\ndomain = 2\nplugin = \"m\"\nvbd = \"xvdb\"\n\
                 [[disk]]\ndomain = \"g\"\nplugin = \"m\"\nvbd = \"51728\"\n",
                "disks 1 and 3 both give domain g the device xvdb",
            ),
            ("x = 1\n", "unknown top-level key `x`"),
            ("", "no [[disk]]"),
            ("[[disk]]\nplugin = \"m\"\n", "disk 1: `domain` is required"),
            ("[[disk]]\ndomain = 1\n", "`plugin` is required"),
            (
                "[[disk]]\ndomain = 1\nplugin = \"m\"\nreadonly = \"yes\"\n",
                "`readonly`",
            ),
            (
                "[[disk]]\ndomain = 1\nplugin = \"m\"\nsector-size = 1024\n",
                "`sector-size`",
            ),
            (
                "[[disk]]\ndomain = 1\nplugin = \"m\"\nqueues = 0\n",
                "`queues`",
            ),
            (
                "[[disk]]\ndomain = 1\nplugin = \"m\"\nvbd = \"sdq\"\n",
                "`vbd`",
            ),
            (
                "[[disk]]\ndomain = 1\nplugin = \"m\"\nanswer-on-completion = 1\n",
                "`answer-on-completion` must be true or false",
            ),
            (
                "[[disk]]\ndomain = 1\nplugin = \"m\"\ncolour = 1\n",
                "unknown key `colour`",
            ),
            ("[[disk]]\ndomain = 99999\nplugin = \"m\"\n", "out of range"),
            (
                "[[disk]]\ndomain = 1\nplugin = \"m\"\n[[disk]]\nplugin = 3\ndomain = 1\n",
                "disk 2: `plugin`",
            ),
        ];
        for (text, needle) in cases {
            let e = parse(text).unwrap_err();
            assert!(
                e.starts_with("disks.toml") && e.contains(needle),
                "{text:?}: {e}"
            );
        }
    }

    #[test]
    fn domains_are_ids_uuids_or_names() {
        assert_eq!(DomainRef::parse("0"), Ok(DomainRef::Id(0)));
        assert_eq!(
            DomainRef::parse("6F9619FF-8B86-D011-B42D-00C04FC964FF"),
            Ok(DomainRef::Uuid(
                "6f9619ff-8b86-d011-b42d-00c04fc964ff".into()
            ))
        );
        assert_eq!(
            DomainRef::parse("web-1"),
            Ok(DomainRef::Name("web-1".into()))
        );
        assert!(DomainRef::parse(" ").is_err());
    }
}
