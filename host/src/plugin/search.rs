//! The plugin search path: how `--plugin mmap` becomes `/usr/lib/xen-disk/plugins/libmmap.so`.
//!
//! A spec containing a `/` is a path. Anything else is a name: `mmap`, `ceph-rbd` (the file
//! spells `-` as `_`), or a file name `libmmap.so`, looked up in order on
//! `$XEN_DISK_PLUGIN_PATH` (colon-separated), the directory of the running binary, the
//! plugin directory of the binary's own prefix (`<prefix>/lib/xen-disk/plugins` beside
//! `<prefix>/bin`, when it exists) and `/usr/lib/xen-disk/plugins`. The prefix's directory
//! is where the package puts the plugins: `/usr/bin/xen-disk-host` finds them at
//! `/usr/lib/xen-disk/plugins`, and so does a package unpacked anywhere else (`dpkg -x`,
//! `/usr/local`) in its own tree.

use std::path::{Path, PathBuf};

/// The system-wide plugin directory.
pub const SYSTEM_PLUGIN_DIR: &str = "/usr/lib/xen-disk/plugins";

/// The plugin directory below an installation prefix (`/usr` → `/usr/lib/xen-disk/plugins`).
const PREFIX_PLUGIN_DIR: &str = "lib/xen-disk/plugins";

/// The directories searched, in order.
pub fn search_path() -> Vec<PathBuf> {
    let env = std::env::var_os("XEN_DISK_PLUGIN_PATH");
    let exe = std::env::current_exe().ok();
    search_path_for(env.as_deref(), exe.as_deref())
}

/// [`search_path`] for a given `$XEN_DISK_PLUGIN_PATH` and binary. A directory listed twice
/// is searched once, at its first place.
fn search_path_for(env: Option<&std::ffi::OsStr>, exe: Option<&Path>) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(env) = env {
        dirs.extend(std::env::split_paths(env).filter(|p| !p.as_os_str().is_empty()));
    }
    if let Some(bin) = exe.and_then(Path::parent) {
        dirs.push(bin.to_path_buf());
        // Only when it exists: a binary in target/debug has no such directory, and naming
        // one in every "not found" message would mislead.
        if let Some(prefix) = bin.parent() {
            let dir = prefix.join(PREFIX_PLUGIN_DIR);
            if dir.is_dir() {
                dirs.push(dir);
            }
        }
    }
    dirs.push(PathBuf::from(SYSTEM_PLUGIN_DIR));
    let mut seen = std::collections::HashSet::new();
    dirs.retain(|d| seen.insert(d.clone()));
    dirs
}

/// The file name a plugin name maps to: `ceph-rbd` → `libceph_rbd.so`.
pub fn file_name(name: &str) -> String {
    if name.starts_with("lib") && name.ends_with(".so") {
        name.to_string()
    } else {
        format!("lib{}.so", name.replace('-', "_"))
    }
}

/// Why a `--plugin` argument names no file.
#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    /// An empty argument.
    #[error("empty plugin name")]
    Empty,
    /// A path that does not exist.
    #[error("plugin {0}: no such file")]
    NoSuchFile(String),
    /// A name found in none of the directories: where it looked, and the nearest name there.
    #[error("plugin {spec}: no {file} in {}{}", looked.join(", "), suggestion.as_ref().map(|n| format!("; did you mean {n}?")).unwrap_or_default())]
    NotOnPath {
        spec: String,
        file: String,
        looked: Vec<String>,
        suggestion: Option<String>,
    },
}

/// Resolves a `--plugin` argument to a file, or says where it looked.
pub fn resolve(spec: &str) -> Result<PathBuf, SearchError> {
    if spec.is_empty() {
        return Err(SearchError::Empty);
    }
    if spec.contains('/') {
        let p = PathBuf::from(spec);
        return if p.exists() {
            Ok(p)
        } else {
            Err(SearchError::NoSuchFile(spec.to_string()))
        };
    }
    resolve_in(spec, &search_path())
}

/// [`resolve`] for a name, on the directories `dirs`.
fn resolve_in(spec: &str, dirs: &[PathBuf]) -> Result<PathBuf, SearchError> {
    let file = file_name(spec);
    for dir in dirs {
        let candidate = dir.join(&file);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    let looked: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    let names: Vec<String> = plugins_in(dirs)
        .iter()
        .filter_map(|p| plugin_name(p))
        .collect();
    Err(SearchError::NotOnPath {
        spec: spec.to_string(),
        suggestion: closest(spec, &names).map(str::to_string),
        file,
        looked,
    })
}

/// The name a plugin file answers to: `libceph_rbd.so` → `ceph-rbd`.
fn plugin_name(file: &Path) -> Option<String> {
    let n = file.file_name()?.to_str()?;
    Some(
        n.strip_prefix("lib")?
            .strip_suffix(".so")?
            .replace('_', "-"),
    )
}

/// The name in `names` nearest to `typed`, when it is near enough to be a typo: at most one
/// edit in a short name, two in a longer one.
fn closest<'a>(typed: &str, names: &'a [String]) -> Option<&'a str> {
    let typed = typed.strip_prefix("lib").unwrap_or(typed);
    let typed = typed.strip_suffix(".so").unwrap_or(typed).replace('_', "-");
    let most = if typed.chars().count() <= 4 { 1 } else { 2 };
    names
        .iter()
        .map(|n| (edit_distance(&typed, n), n))
        .filter(|(d, _)| *d <= most)
        .min_by_key(|(d, _)| *d)
        .map(|(_, n)| n.as_str())
}

/// Insertions, deletions, substitutions and swaps of neighbours that turn `a` into `b`
/// (optimal string alignment distance), by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    // d[i][j]: the distance between a[..i] and b[..j].
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

/// Every `lib*.so` on the search path (first occurrence of a file name wins).
pub fn find_plugins() -> Vec<PathBuf> {
    plugins_in(&search_path())
}

/// Every `lib*.so` in `dirs` (first occurrence of a file name wins).
fn plugins_in(dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut seen = std::collections::HashSet::new();
    let mut found = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                n.starts_with("lib") && n.ends_with(".so") && p.is_file()
            })
            .collect();
        files.sort();
        for f in files {
            if seen.insert(f.file_name().map(|n| n.to_owned())) {
                found.push(f);
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_files() {
        assert_eq!(file_name("mmap"), "libmmap.so");
        assert_eq!(file_name("ceph-rbd"), "libceph_rbd.so");
        assert_eq!(file_name("libcow.so"), "libcow.so");
    }

    #[test]
    fn paths_must_exist_and_names_say_where_they_looked() {
        assert!(resolve("./definitely/not/here.so")
            .unwrap_err()
            .to_string()
            .contains("no such file"));
        let e = resolve("no-such-plugin-xyz").unwrap_err().to_string();
        assert!(
            e.contains("libno_such_plugin_xyz.so") && e.contains(SYSTEM_PLUGIN_DIR),
            "{e}"
        );
    }

    #[test]
    fn a_typo_gets_the_nearest_plugin_on_the_path() {
        let dir = std::env::temp_dir().join(format!("xen-disk-search-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["libfile.so", "libmmap.so", "libceph_rbd.so", "libqcow2.so"] {
            std::fs::write(dir.join(f), b"").unwrap();
        }
        let dirs = [dir.clone()];
        let e = resolve_in("fiel", &dirs).unwrap_err().to_string();
        assert!(
            e.starts_with("plugin fiel: no libfiel.so in ") && e.ends_with("; did you mean file?"),
            "{e}"
        );
        assert!(resolve_in("ceph-rdb", &dirs)
            .unwrap_err()
            .to_string()
            .ends_with("did you mean ceph-rbd?"));
        assert!(resolve_in("qcow", &dirs)
            .unwrap_err()
            .to_string()
            .ends_with("did you mean qcow2?"));
        assert!(resolve_in("libmap.so", &dirs)
            .unwrap_err()
            .to_string()
            .ends_with("did you mean mmap?"));
        // Nothing near: no guess.
        assert!(!resolve_in("vhd", &dirs)
            .unwrap_err()
            .to_string()
            .contains("did you mean"));
        assert!(!resolve_in("nbd-client", &dirs)
            .unwrap_err()
            .to_string()
            .contains("did you mean"));
        assert_eq!(resolve_in("file", &dirs).unwrap(), dir.join("libfile.so"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_system_directory_is_searched_by_default_and_the_prefix_one_when_it_exists() {
        let bare = search_path_for(None, None);
        assert_eq!(bare, [PathBuf::from(SYSTEM_PLUGIN_DIR)]);
        // The package's layout: /usr/bin beside /usr/lib/xen-disk/plugins, which is then
        // searched once, before any other directory the environment does not name.
        let root = std::env::temp_dir().join(format!("xen-disk-prefix-{}", std::process::id()));
        let plugins = root.join("usr/lib/xen-disk/plugins");
        std::fs::create_dir_all(&plugins).unwrap();
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        std::fs::write(plugins.join("libfile.so"), b"").unwrap();
        let exe = root.join("usr/bin/xen-disk-host");
        let dirs = search_path_for(Some("/a:/b".as_ref()), Some(&exe));
        assert_eq!(
            dirs,
            [
                PathBuf::from("/a"),
                PathBuf::from("/b"),
                root.join("usr/bin"),
                plugins.clone(),
                PathBuf::from(SYSTEM_PLUGIN_DIR)
            ]
        );
        assert_eq!(
            resolve_in("file", &dirs).unwrap(),
            plugins.join("libfile.so")
        );
        // The installed binary's own prefix is the system one: listed once.
        let usr = search_path_for(None, Some(Path::new("/usr/bin/xen-disk-host")));
        let n = usr
            .iter()
            .filter(|d| *d == Path::new(SYSTEM_PLUGIN_DIR))
            .count();
        assert_eq!(n, 1, "{usr:?}");
        // Without the directory, the prefix adds nothing.
        std::fs::remove_dir_all(root.join("usr/lib")).unwrap();
        assert!(!search_path_for(None, Some(&exe))
            .iter()
            .any(|d| d.starts_with(root.join("usr/lib"))));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("file", "file"), 0);
        assert_eq!(edit_distance("fiel", "file"), 1);
        assert_eq!(edit_distance("fle", "file"), 1);
        assert_eq!(edit_distance("filee", "file"), 1);
        assert_eq!(edit_distance("mmap", "qcow2"), 5);
        assert_eq!(edit_distance("", "vhd"), 3);
    }
}
