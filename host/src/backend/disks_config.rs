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
//! [disk.limits]                # optional I/O limits (`ctl limit` changes them live)
//! read-iops = 500              # requests per second; `-burst` keys set the burst
//! write-bps = "20M"            # bytes per second (a number, or a size string)
//! [disk.plugin-config]         # the same table `-c key=value` builds
//! path = "/images/gold.img"
//! shared = false
//! ```
//!
//! Every mistake is one line naming the file, the disk (by position) and the key. A file
//! without `[[disk]]` (comments only, or empty) lists no disks.

use super::limits::IoLimits;
use super::vbd::Vbd;
use std::path::{Path, PathBuf};
use xen_disk_plugin_api::Config;

/// Why a domain as written is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainRefError {
    /// Blank.
    #[error("empty domain")]
    Empty,
    /// Digits, but not a domain id (0 to 0x7fef).
    #[error("domain id {0} is out of range")]
    IdOutOfRange(String),
}

/// A TOML syntax error: the file, where, and the parser's words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}: not valid TOML: {message}", file.display(), at.map(|(l, c)| format!(":{l}:{c}")).unwrap_or_default())]
pub struct TomlError {
    /// The file.
    pub file: PathBuf,
    /// Line and column (1-based), when the parser knows them.
    pub at: Option<(usize, usize)>,
    /// What the parser said.
    pub message: String,
}

/// What is wrong with a disks file: each case names the file, and the disk by position.
#[derive(Debug, thiserror::Error)]
pub enum DisksConfigError {
    /// The file could not be read.
    #[error("{}: {source}", file.display())]
    Read {
        /// The file.
        file: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not TOML.
    #[error(transparent)]
    Toml(#[from] TomlError),
    /// A top-level key other than `disk`.
    #[error("{}: unknown top-level key `{key}` (expected [[disk]] tables)", file.display())]
    UnknownTopLevelKey {
        /// The file.
        file: PathBuf,
        /// The key.
        key: String,
    },
    /// `disk` is not an array of tables.
    #[error("{}: `disk` must be an array of tables ([[disk]])", file.display())]
    DiskNotArray {
        /// The file.
        file: PathBuf,
    },
    /// One entry is wrong.
    #[error("{}: disk {number}: {source}", file.display())]
    Disk {
        /// The file.
        file: PathBuf,
        /// The entry's position (1-based).
        number: usize,
        /// What is wrong with it.
        #[source]
        source: DiskEntryError,
    },
    /// Two entries give one guest the same device.
    #[error("{}: disks {first} and {second} both give domain {domain} the device {}", file.display(), vbd.linux_name())]
    SameDevice {
        /// The file.
        file: PathBuf,
        /// The earlier entry (1-based).
        first: usize,
        /// The later entry (1-based).
        second: usize,
        /// Their guest.
        domain: DomainRef,
        /// Their device.
        vbd: Vbd,
    },
}

/// What is wrong with one `[[disk]]` entry: each case names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiskEntryError {
    /// The entry is not a table.
    #[error("not a table")]
    NotATable,
    /// A key this file does not have.
    #[error("unknown key `{0}` (known: {known})", known = DISK_KEYS.join(", "))]
    UnknownKey(String),
    /// A required key is absent.
    #[error("`{0}` is required")]
    Required(&'static str),
    /// A value of the wrong TOML type.
    #[error("`{key}` must be {expected}, not {found}")]
    WrongType {
        /// The key.
        key: &'static str,
        /// What it must be, in words.
        expected: &'static str,
        /// What it is.
        found: String,
    },
    /// A value of the right type that the key does not allow.
    #[error("`{key}` = {value} {rule}")]
    Refused {
        /// The key.
        key: &'static str,
        /// The value, as written.
        value: String,
        /// What is wrong, or what it must be.
        rule: &'static str,
    },
    /// `domain` is not a domain.
    #[error("`domain` {0}")]
    Domain(#[source] DomainRefError),
    /// A key of the `limits` table (the message names it).
    #[error("`limits`: {0}")]
    Limits(String),
}

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
    pub fn parse(text: &str) -> Result<DomainRef, DomainRefError> {
        let t = text.trim();
        if t.is_empty() {
            return Err(DomainRefError::Empty);
        }
        if t.bytes().all(|b| b.is_ascii_digit()) {
            return t
                .parse::<u32>()
                .ok()
                .filter(|&d| d < 0x7ff0)
                .map(DomainRef::Id)
                .ok_or_else(|| DomainRefError::IdOutOfRange(t.to_string()));
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
    /// The disk's I/O limits (none: unlimited).
    pub limits: IoLimits,
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
    "limits",
    "plugin-config",
];

/// Reads and parses a disks file.
pub fn load_disks(file: &Path) -> Result<Vec<DiskSpec>, DisksConfigError> {
    let text = std::fs::read_to_string(file).map_err(|source| DisksConfigError::Read {
        file: file.to_path_buf(),
        source,
    })?;
    parse_disks(file, &text)
}

/// Parses a disks file's text; `file` names it in errors.
pub fn parse_disks(file: &Path, text: &str) -> Result<Vec<DiskSpec>, DisksConfigError> {
    let f = || file.to_path_buf();
    let doc = parse_toml(file, text)?;
    if let Some(key) = doc.keys().find(|k| *k != "disk") {
        return Err(DisksConfigError::UnknownTopLevelKey {
            file: f(),
            key: key.clone(),
        });
    }
    let disks = match doc.get("disk") {
        // No disks (a file of comments, as the package installs): `serve` then serves the
        // toolstack's devices alone, and a reload to such a file detaches every configured disk.
        None => return Ok(Vec::new()),
        Some(toml::Value::Array(a)) => a,
        Some(_) => return Err(DisksConfigError::DiskNotArray { file: f() }),
    };
    let specs = disks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            parse_disk(d).map_err(|source| DisksConfigError::Disk {
                file: f(),
                number: i + 1,
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Two entries for one guest device can never both be served: refused here, once, rather
    // than the second failing to attach round after round.
    for (j, b) in specs.iter().enumerate() {
        let Some(vbd) = b.vbd else { continue };
        if let Some(i) = specs[..j]
            .iter()
            .position(|a| a.vbd == Some(vbd) && a.domain == b.domain)
        {
            return Err(DisksConfigError::SameDevice {
                file: f(),
                first: i + 1,
                second: j + 1,
                domain: b.domain.clone(),
                vbd,
            });
        }
    }
    Ok(specs)
}

/// Parses TOML text; a syntax error names the file, line and column.
pub fn parse_toml(file: &Path, text: &str) -> Result<toml::Table, TomlError> {
    text.parse().map_err(|e: toml::de::Error| {
        let at = e.span().map(|span| {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |n| n + 1) + 1;
            (line, column)
        });
        TomlError {
            file: file.to_path_buf(),
            at,
            message: e.message().trim().to_string(),
        }
    })
}

fn parse_disk(value: &toml::Value) -> Result<DiskSpec, DiskEntryError> {
    let t = value.as_table().ok_or(DiskEntryError::NotATable)?;
    if let Some(key) = t.keys().find(|k| !DISK_KEYS.contains(&k.as_str())) {
        return Err(DiskEntryError::UnknownKey(key.clone()));
    }
    let wrong_type =
        |key: &'static str, expected: &'static str, v: &toml::Value| DiskEntryError::WrongType {
            key,
            expected,
            found: v.to_string(),
        };
    let string = |k: &'static str| -> Result<Option<&str>, DiskEntryError> {
        match t.get(k) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(wrong_type(k, "a string", v)),
        }
    };
    let number = |k: &'static str| -> Result<Option<u32>, DiskEntryError> {
        match t.get(k) {
            None => Ok(None),
            Some(toml::Value::Integer(n)) => {
                u32::try_from(*n)
                    .map(Some)
                    .map_err(|_| DiskEntryError::Refused {
                        key: k,
                        value: n.to_string(),
                        rule: "is out of range",
                    })
            }
            Some(v) => Err(wrong_type(k, "a number", v)),
        }
    };
    let boolean = |k: &'static str| -> Result<Option<bool>, DiskEntryError> {
        match t.get(k) {
            None => Ok(None),
            Some(toml::Value::Boolean(b)) => Ok(Some(*b)),
            Some(v) => Err(wrong_type(k, "true or false", v)),
        }
    };
    let domain = match t.get("domain") {
        Some(toml::Value::Integer(n)) => {
            DomainRef::parse(&n.to_string()).map_err(DiskEntryError::Domain)?
        }
        Some(toml::Value::String(s)) => DomainRef::parse(s).map_err(DiskEntryError::Domain)?,
        Some(v) => return Err(wrong_type("domain", "a domid, name or UUID", v)),
        None => return Err(DiskEntryError::Required("domain")),
    };
    let plugin = string("plugin")?
        .ok_or(DiskEntryError::Required("plugin"))?
        .to_string();
    let readonly = boolean("readonly")?.unwrap_or(false);
    let answer_on_completion = boolean("answer-on-completion")?;
    let sector_size = number("sector-size")?;
    if let Some(s) = sector_size.filter(|s| *s != 512 && *s != 4096) {
        return Err(DiskEntryError::Refused {
            key: "sector-size",
            value: s.to_string(),
            rule: "(must be 512 or 4096)",
        });
    }
    let queues = number("queues")?;
    if let Some(q) = queues.filter(|q| *q == 0 || *q > 64) {
        return Err(DiskEntryError::Refused {
            key: "queues",
            value: q.to_string(),
            rule: "(must be 1 to 64)",
        });
    }
    let vbd = string("vbd")?
        .map(|v| {
            Vbd::parse(v).ok_or_else(|| DiskEntryError::Refused {
                key: "vbd",
                value: format!("`{v}`"),
                rule: "is not a device like xvdb",
            })
        })
        .transpose()?;
    let limits = match t.get("limits") {
        None => IoLimits::default(),
        Some(toml::Value::Table(l)) => parse_limits(l).map_err(DiskEntryError::Limits)?,
        Some(v) => return Err(wrong_type("limits", "a table", v)),
    };
    let plugin_config = match t.get("plugin-config") {
        None => Config::new(),
        Some(toml::Value::Table(c)) => Config::from_table(c.clone()),
        Some(v) => return Err(wrong_type("plugin-config", "a table", v)),
    };
    Ok(DiskSpec {
        domain,
        plugin,
        readonly,
        sector_size,
        queues,
        vbd,
        answer_on_completion,
        limits,
        plugin_config,
    })
}

/// A `[disk.limits]` table: the keys of `ctl limit`, each a whole number (or, for the
/// `-bps` keys, a size string such as "20M"). Rates before bursts, whatever the order.
fn parse_limits(t: &toml::Table) -> Result<IoLimits, String> {
    let mut limits = IoLimits::default();
    let mut keys: Vec<&String> = t.keys().collect();
    keys.sort_by_key(|k| k.ends_with("-burst"));
    for k in keys {
        let v = match &t[k.as_str()] {
            toml::Value::Integer(n) if *n >= 0 => n.to_string(),
            toml::Value::String(s) => s.clone(),
            v => return Err(format!("`{k}` must be a number or a size string, not {v}")),
        };
        limits.set(k, &v)?;
    }
    Ok(limits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<DiskSpec>, DisksConfigError> {
        parse_disks(Path::new("disks.toml"), text)
    }

    #[test]
    fn a_file_of_comments_lists_no_disks_but_a_misspelt_table_is_refused() {
        assert!(parse("").unwrap().is_empty());
        assert!(parse("# [[disk]]\n# domain = \"a\"\n").unwrap().is_empty());
        assert!(matches!(
            parse("[[disks]]\ndomain = \"a\"\n"),
            Err(DisksConfigError::UnknownTopLevelKey { .. })
        ));
        assert!(matches!(
            parse("[disk]\ndomain = \"a\"\n"),
            Err(DisksConfigError::DiskNotArray { .. })
        ));
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
    fn limits_parse_from_their_table_and_name_a_bad_key() {
        let d = parse(
            "[[disk]]\ndomain = 1\nplugin = \"file\"\n[disk.limits]\n\
             read-iops-burst = 50\nread-iops = 500\nwrite-bps = \"20M\"\nwrite-iops = 0\n",
        )
        .unwrap();
        let l = d[0].limits;
        assert_eq!(
            l.read_iops,
            Some(super::super::limits::Rate {
                per_second: 500,
                burst: 50
            })
        );
        assert_eq!(l.write_bps.map(|r| r.per_second), Some(20 << 20));
        assert_eq!((l.write_iops, l.read_bps), (None, None));
        for (text, want) in [
            (
                "[disk.limits]\nspeed = 5\n",
                "disks.toml: disk 1: `limits`: unknown limit `speed`",
            ),
            (
                "[disk.limits]\nread-iops = -5\n",
                "disks.toml: disk 1: `limits`: `read-iops` must be a number or a size string",
            ),
            (
                "[disk.limits]\nwrite-bps = \"fast\"\n",
                "disks.toml: disk 1: `limits`: `write-bps`",
            ),
            (
                "limits = 5\n",
                "disks.toml: disk 1: `limits` must be a table",
            ),
        ] {
            let e = parse(&format!("[[disk]]\ndomain = 1\nplugin = \"file\"\n{text}"))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(want), "{text}: {e}");
        }
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
            let e = parse(text).unwrap_err().to_string();
            assert!(
                e.starts_with("disks.toml") && e.contains(needle),
                "{text:?}: {e}"
            );
        }
    }

    #[test]
    fn an_error_keeps_the_file_the_disk_and_the_key() {
        let e = parse(
            "[[disk]]\ndomain = 1\nplugin = \"m\"\n[[disk]]\ndomain = 1\nplugin = \"m\"\nqueues = 65\n",
        )
        .unwrap_err();
        match &e {
            DisksConfigError::Disk {
                file,
                number: 2,
                source:
                    DiskEntryError::Refused {
                        key: "queues",
                        value,
                        ..
                    },
            } if file == Path::new("disks.toml") && value == "65" => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(
            e.to_string(),
            "disks.toml: disk 2: `queues` = 65 (must be 1 to 64)"
        );
        let missing = load_disks(Path::new("/nonexistent/disks.toml")).unwrap_err();
        assert!(
            matches!(&missing, DisksConfigError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound),
            "{missing:?}"
        );
        assert!(missing.to_string().starts_with("/nonexistent/disks.toml: "));
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
