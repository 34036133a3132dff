//! Plugin configuration: the keys a plugin declares and the table it is opened with.
//!
//! Users configure a plugin with `-c key=value` on the command line or a `[plugin-config]`
//! table in a TOML file; both produce the same TOML table ([`Config::from_pairs`] is the
//! command-line half). Before `open` is called the export glue checks the table against the
//! plugin's declared [`ConfigKey`]s: unknown keys, ill-typed values and missing required keys
//! are refused with one line naming the key, and declared defaults are filled in. So inside
//! `open`, `config.bool("shared")?` cannot fail for a key that has a default.

use crate::error::{Error, ErrorKind, Result};
use std::path::PathBuf;

/// The type of a configuration value.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, abi_stable::StableAbi)]
pub enum KeyType {
    /// Any string.
    String = 0,
    /// A file or device path (a string).
    Path = 1,
    /// `true` / `false` (also `yes`/`no`, `on`/`off`, `1`/`0` on the command line).
    Bool = 2,
    /// A non-negative integer.
    Integer = 3,
    /// A byte count: an integer, or a string with a suffix `K`, `M`, `G`, `T` (powers of 1024,
    /// optional `iB`/`B`), e.g. `64M`, `1GiB`, `4096`.
    Size = 4,
}

impl KeyType {
    /// The name shown to users.
    pub fn name(self) -> &'static str {
        match self {
            KeyType::String => "string",
            KeyType::Path => "path",
            KeyType::Bool => "bool",
            KeyType::Integer => "integer",
            KeyType::Size => "size",
        }
    }
}

/// One configuration key a plugin accepts. Build them in a `const` slice:
///
/// ```
/// use xen_disk_plugin_api::{ConfigKey, KeyType};
/// const KEYS: &[ConfigKey] = &[
///     ConfigKey::required("path", KeyType::Path, "The image file"),
///     ConfigKey::optional("shared", KeyType::Bool, "true", "Write through to the file"),
/// ];
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigKey {
    /// The key as users type it.
    pub name: &'static str,
    /// Its type.
    pub ty: KeyType,
    /// The default, written as a user would type it; `None` for no default.
    pub default: Option<&'static str>,
    /// True when `open` must not be called without it.
    pub required: bool,
    /// One line of help.
    pub help: &'static str,
}

impl ConfigKey {
    /// A key that must be given.
    pub const fn required(name: &'static str, ty: KeyType, help: &'static str) -> Self {
        ConfigKey {
            name,
            ty,
            default: None,
            required: true,
            help,
        }
    }

    /// A key with a default.
    pub const fn optional(
        name: &'static str,
        ty: KeyType,
        default: &'static str,
        help: &'static str,
    ) -> Self {
        ConfigKey {
            name,
            ty,
            default: Some(default),
            required: false,
            help,
        }
    }

    /// A key that may be absent and has no default (check with `config.opt_*`).
    pub const fn maybe(name: &'static str, ty: KeyType, help: &'static str) -> Self {
        ConfigKey {
            name,
            ty,
            default: None,
            required: false,
            help,
        }
    }
}

/// Parses a byte count: `4096`, `64K`, `1M`, `1G`, `2GiB`, `1T` (powers of 1024). A decimal
/// (`1.5G`) is taken when it comes to a whole number of bytes; `1.3K` (1331.2 bytes) is
/// refused. Whether the count suits the key (a multiple of the sector size, say) is the
/// reader's check.
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let number_end = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (whole, fraction) = match t[..number_end].split_once('.') {
        Some((w, f)) => (w, f),
        None => (&t[..number_end], ""),
    };
    if whole.is_empty() || fraction.contains('.') || t[..number_end].ends_with('.') {
        return Err(format!(
            "`{text}` is not a size (expected e.g. 4096, 64M, 1.5G)"
        ));
    }
    let shift = match t[number_end..].trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        other => return Err(format!("`{text}`: unknown size suffix `{other}`")),
    };
    let too_large = || format!("`{text}` is too large");
    // Exact arithmetic: (whole.fraction × 10^digits) × 2^shift, divided back by 10^digits,
    // in u128 so that no step rounds.
    let whole: u128 = whole.parse().map_err(|_| too_large())?;
    let scale = 10u128
        .checked_pow(fraction.len() as u32)
        .filter(|_| fraction.len() <= 20)
        .ok_or_else(too_large)?;
    let fraction: u128 = if fraction.is_empty() {
        0
    } else {
        fraction.parse().map_err(|_| too_large())?
    };
    let scaled = whole
        .checked_mul(scale)
        .and_then(|w| w.checked_add(fraction))
        .and_then(|n| n.checked_mul(1u128 << shift))
        .ok_or_else(too_large)?;
    if scaled % scale != 0 {
        return Err(format!(
            "`{text}` is not a whole number of bytes (about {:.1})",
            scaled as f64 / scale as f64
        ));
    }
    u64::try_from(scaled / scale).map_err(|_| too_large())
}

fn parse_bool(text: &str) -> Option<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Some(true),
        "false" | "no" | "off" | "0" => Some(false),
        _ => None,
    }
}

/// Turns a command-line value into a TOML value the way a user means it: `false` is a bool,
/// `42` an integer, anything else (`/x`, `1G`, `a b`) a string.
pub fn value_from_cli(text: &str) -> toml::Value {
    if let Some(b) = parse_bool(text).filter(|_| matches!(text, "true" | "false")) {
        return toml::Value::Boolean(b);
    }
    if let Ok(i) = text.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    toml::Value::String(text.to_string())
}

/// A plugin's configuration: a TOML table, checked against the plugin's declared keys.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Config {
    table: toml::Table,
}

impl Config {
    /// An empty configuration.
    pub fn new() -> Self {
        Config::default()
    }

    /// Wraps a TOML table (e.g. a config file's `[disk.plugin-config]`).
    pub fn from_table(table: toml::Table) -> Self {
        Config { table }
    }

    /// Builds the table from `key=value` strings, as `-c key=value` gives them. A dotted key
    /// (`base.path=x`) makes a nested table, as it would in TOML.
    pub fn from_pairs<S: AsRef<str>>(pairs: &[S]) -> std::result::Result<Self, String> {
        let mut config = Config::new();
        for pair in pairs {
            let pair = pair.as_ref();
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("`{pair}`: expected key=value"))?;
            let key = key.trim();
            if key.is_empty() {
                return Err(format!("`{pair}`: empty key"));
            }
            config.set(key, value_from_cli(value))?;
        }
        Ok(config)
    }

    /// Sets `key` (dotted keys nest) to `value`, replacing what was there.
    ///
    /// Layered plugins are configured with a table per layer, and a string can name a layer's
    /// plugin: `base=vhd` then `base.path=x` (or the other way round) make the table
    /// `base = { plugin = "vhd", path = "x" }`.
    pub fn set(&mut self, key: &str, value: toml::Value) -> std::result::Result<(), String> {
        let mut parts: Vec<&str> = key.split('.').collect();
        let last = parts.pop().unwrap_or(key);
        if parts.iter().chain([&last]).any(|p| p.is_empty()) {
            return Err(format!("config key `{key}`: empty part"));
        }
        let mut table = &mut self.table;
        for p in parts {
            let entry = table
                .entry(p.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let toml::Value::String(name) = entry {
                let mut t = toml::Table::new();
                t.insert("plugin".into(), toml::Value::String(std::mem::take(name)));
                *entry = toml::Value::Table(t);
            }
            table = entry
                .as_table_mut()
                .ok_or_else(|| format!("config key `{key}`: `{p}` is not a table"))?;
        }
        match (table.get_mut(last), value) {
            (Some(toml::Value::Table(t)), toml::Value::String(name)) => {
                t.insert("plugin".into(), toml::Value::String(name));
            }
            (_, value) => {
                table.insert(last.to_string(), value);
            }
        }
        Ok(())
    }

    /// Removes a key and returns its value.
    pub fn take(&mut self, key: &str) -> Option<toml::Value> {
        self.table.remove(key)
    }

    /// The underlying table.
    pub fn table(&self) -> &toml::Table {
        &self.table
    }

    /// The configuration as TOML text (how it crosses the plugin boundary).
    pub fn to_toml(&self) -> String {
        toml::to_string(&self.table).unwrap_or_default()
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self> {
        text.parse::<toml::Table>()
            .map(Config::from_table)
            .map_err(|e| {
                Error::new(
                    ErrorKind::Config,
                    format!("configuration is not valid TOML: {e}"),
                )
            })
    }

    /// True when the key is present.
    pub fn contains(&self, key: &str) -> bool {
        self.table.contains_key(key)
    }

    /// The raw value of a key.
    pub fn value(&self, key: &str) -> Option<&toml::Value> {
        self.table.get(key)
    }

    /// A nested table (for layered plugins: `base.*` keys), if present.
    pub fn sub(&self, key: &str) -> Option<Config> {
        self.table
            .get(key)
            .and_then(|v| v.as_table())
            .map(|t| Config::from_table(t.clone()))
    }

    /// Checks the table against `keys`: refuses unknown keys (nested tables are allowed only
    /// where `allow_tables` names them), ill-typed values and missing required keys, and fills in
    /// defaults. `plugin` names the plugin in messages.
    pub fn validate(
        &mut self,
        plugin: &str,
        keys: &[ConfigKey],
        allow_tables: &[&str],
    ) -> Result<()> {
        for (name, value) in &self.table {
            if value.is_table() && allow_tables.contains(&name.as_str()) {
                continue;
            }
            let Some(key) = keys.iter().find(|k| k.name == name) else {
                let known: Vec<&str> = keys.iter().map(|k| k.name).collect();
                return Err(Error::config(
                    name,
                    format!(
                        "unknown key for plugin {plugin} (it takes: {})",
                        if known.is_empty() {
                            "no keys".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                ));
            };
            check_type(key, value)?;
        }
        for key in keys {
            if self.table.contains_key(key.name) {
                continue;
            }
            if let Some(default) = key.default {
                self.table
                    .insert(key.name.to_string(), value_from_cli(default));
            } else if key.required {
                return Err(Error::config(
                    key.name,
                    format!("is required by plugin {plugin}"),
                ));
            }
        }
        Ok(())
    }

    fn get(&self, key: &str) -> Result<&toml::Value> {
        self.table
            .get(key)
            .ok_or_else(|| Error::config(key, "is required"))
    }

    /// A string (or path) value.
    pub fn str(&self, key: &str) -> Result<&str> {
        let v = self.get(key)?;
        v.as_str()
            .ok_or_else(|| Error::config(key, format!("expected a string, got {v}")))
    }

    /// An optional string value.
    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        if self.contains(key) {
            self.str(key).map(Some)
        } else {
            Ok(None)
        }
    }

    /// A path value.
    pub fn path(&self, key: &str) -> Result<PathBuf> {
        self.str(key).map(PathBuf::from)
    }

    /// An optional path value.
    pub fn opt_path(&self, key: &str) -> Result<Option<PathBuf>> {
        Ok(self.opt_str(key)?.map(PathBuf::from))
    }

    /// A boolean value.
    pub fn bool(&self, key: &str) -> Result<bool> {
        as_bool(key, self.get(key)?)
    }

    /// An optional boolean value.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.table.get(key).map(|v| as_bool(key, v)).transpose()
    }

    /// A non-negative integer value.
    pub fn u64(&self, key: &str) -> Result<u64> {
        as_u64(key, self.get(key)?)
    }

    /// An optional non-negative integer value.
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        self.table.get(key).map(|v| as_u64(key, v)).transpose()
    }

    /// A byte count (`1G`, `4096`).
    pub fn size(&self, key: &str) -> Result<u64> {
        as_size(key, self.get(key)?)
    }

    /// An optional byte count.
    pub fn opt_size(&self, key: &str) -> Result<Option<u64>> {
        self.table.get(key).map(|v| as_size(key, v)).transpose()
    }
}

fn as_bool(key: &str, v: &toml::Value) -> Result<bool> {
    match v {
        toml::Value::Boolean(b) => Some(*b),
        toml::Value::Integer(0) => Some(false),
        toml::Value::Integer(1) => Some(true),
        toml::Value::String(s) => parse_bool(s),
        _ => None,
    }
    .ok_or_else(|| Error::config(key, format!("expected true or false, got {v}")))
}

fn as_u64(key: &str, v: &toml::Value) -> Result<u64> {
    match v {
        toml::Value::Integer(i) if *i >= 0 => Some(*i as u64),
        toml::Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    }
    .ok_or_else(|| Error::config(key, format!("expected a non-negative integer, got {v}")))
}

fn as_size(key: &str, v: &toml::Value) -> Result<u64> {
    match v {
        toml::Value::Integer(i) if *i >= 0 => Ok(*i as u64),
        toml::Value::String(s) => parse_size(s).map_err(|e| Error::config(key, e)),
        _ => Err(Error::config(
            key,
            format!("expected a size such as 64M or 1G, got {v}"),
        )),
    }
}

fn check_type(key: &ConfigKey, v: &toml::Value) -> Result<()> {
    match key.ty {
        KeyType::String | KeyType::Path => match v {
            toml::Value::String(_) => Ok(()),
            _ => Err(Error::config(
                key.name,
                format!("expected a {}, got {v}", key.ty.name()),
            )),
        },
        KeyType::Bool => as_bool(key.name, v).map(drop),
        KeyType::Integer => as_u64(key.name, v).map(drop),
        KeyType::Size => as_size(key.name, v).map(drop),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYS: &[ConfigKey] = &[
        ConfigKey::required("path", KeyType::Path, "file"),
        ConfigKey::optional("shared", KeyType::Bool, "true", "share"),
        ConfigKey::optional("size", KeyType::Size, "1G", "size"),
        ConfigKey::maybe("n", KeyType::Integer, "count"),
    ];

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size(" 3 m "), Ok(3 << 20));
        assert!(parse_size("G").is_err());
        assert!(parse_size("1X").is_err());
        assert!(parse_size("99999999999999T").is_err());
    }

    #[test]
    fn decimal_sizes_parse_when_they_are_whole_bytes() {
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("0.5k"), Ok(512));
        assert_eq!(parse_size("2.25M"), Ok(9 << 18));
        assert_eq!(parse_size("1.0"), Ok(1));
        assert_eq!(parse_size("1.500GiB"), Ok(3 << 29));
        let e = parse_size("1.3K").unwrap_err();
        assert!(e.contains("whole number of bytes"), "{e}");
        assert!(parse_size("0.5").unwrap_err().contains("whole number"));
        for bad in [".5G", "1.G", "1..5G", "1.5.5G", "."] {
            assert!(parse_size(bad).unwrap_err().contains("not a size"), "{bad}");
        }
        assert!(parse_size("1.5X").unwrap_err().contains("suffix `x`"));
        assert!(parse_size("16384.5P").unwrap_err().contains("too large"));
        assert!(parse_size("1.000000000000000000000000001G").is_err());
    }

    #[test]
    fn a_decimal_size_reaches_a_key_and_a_fraction_of_a_byte_names_it() {
        let mut c = Config::from_pairs(&["path=/x", "size=1.5G"]).unwrap();
        c.validate("t", KEYS, &[]).unwrap();
        assert_eq!(c.size("size").unwrap(), 3 << 29);
        let e = Config::from_pairs(&["path=/x", "size=1.1"])
            .unwrap()
            .validate("t", KEYS, &[])
            .unwrap_err();
        assert!(
            e.message().contains("`size`") && e.message().contains("whole"),
            "{e}"
        );
    }

    #[test]
    fn cli_pairs_and_toml_table_are_the_same() {
        let cli = Config::from_pairs(&["size=1G", "shared=false", "path=/x", "n=3"]).unwrap();
        let file: toml::Table = "size = \"1G\"\nshared = false\npath = \"/x\"\nn = 3"
            .parse()
            .unwrap();
        assert_eq!(cli, Config::from_table(file));
        assert_eq!(Config::from_toml(&cli.to_toml()).unwrap(), cli);
    }

    #[test]
    fn validate_fills_defaults_and_types() {
        let mut c = Config::from_pairs(&["path=/x"]).unwrap();
        c.validate("t", KEYS, &[]).unwrap();
        assert!(c.bool("shared").unwrap());
        assert_eq!(c.size("size").unwrap(), 1 << 30);
        assert_eq!(c.opt_u64("n").unwrap(), None);
        assert_eq!(c.path("path").unwrap(), PathBuf::from("/x"));
    }

    #[test]
    fn validate_refuses_bad_keys_naming_them() {
        let e = Config::from_pairs(&["path=/x", "sharde=1"])
            .unwrap()
            .validate("t", KEYS, &[])
            .unwrap_err();
        assert!(
            e.message().contains("`sharde`") && e.message().contains("shared"),
            "{e}"
        );
        let e = Config::from_pairs(&["path=/x", "shared=maybe"])
            .unwrap()
            .validate("t", KEYS, &[])
            .unwrap_err();
        assert!(e.message().contains("`shared`"), "{e}");
        let e = Config::from_pairs(&["path=/x", "size=lots"])
            .unwrap()
            .validate("t", KEYS, &[])
            .unwrap_err();
        assert!(e.message().contains("`size`"), "{e}");
        let e = Config::from_pairs(&["shared=true"])
            .unwrap()
            .validate("t", KEYS, &[])
            .unwrap_err();
        assert!(
            e.message().contains("`path`") && e.message().contains("required"),
            "{e}"
        );
        let e = Config::from_pairs(&["path=3"])
            .unwrap()
            .validate("t", KEYS, &[])
            .unwrap_err();
        assert!(e.message().contains("`path`"), "{e}");
        assert!(Config::from_pairs(&["novalue"]).is_err());
    }

    #[test]
    fn dotted_keys_nest_and_a_string_names_a_layers_plugin() {
        let c = Config::from_pairs(&["base=file", "base.path=/g.img"]).unwrap();
        let base = c.sub("base").unwrap();
        assert_eq!(
            (base.str("plugin").unwrap(), base.str("path").unwrap()),
            ("file", "/g.img")
        );
        let d = Config::from_pairs(&["base.path=/g.img", "base=file"]).unwrap();
        assert_eq!(c, d);
        let e =
            Config::from_pairs(&["base.plugin=cow", "base.base=vhd", "base.base.path=/x"]).unwrap();
        assert_eq!(
            e.sub("base")
                .unwrap()
                .sub("base")
                .unwrap()
                .str("path")
                .unwrap(),
            "/x"
        );
        assert!(Config::from_pairs(&["base.=x"]).is_err());
        assert!(Config::from_pairs(&["n=1", "n.x=2"]).is_err());
    }
}
