//! The plugin search path: how `--plugin mmap` becomes `/usr/lib/xen-disk/plugins/libmmap.so`.
//!
//! A spec containing a `/` is a path. Anything else is a name: `mmap`, `ceph-rbd` (the file
//! spells `-` as `_`), or a file name `libmmap.so`, looked up in order on
//! `$XEN_DISK_PLUGIN_PATH` (colon-separated), the directory of the running binary, and
//! `/usr/lib/xen-disk/plugins`.

use std::path::{Path, PathBuf};

/// The system-wide plugin directory.
pub const SYSTEM_PLUGIN_DIR: &str = "/usr/lib/xen-disk/plugins";

/// The directories searched, in order.
pub fn search_path() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(env) = std::env::var_os("XEN_DISK_PLUGIN_PATH") {
        dirs.extend(std::env::split_paths(&env).filter(|p| !p.as_os_str().is_empty()));
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    {
        dirs.push(dir);
    }
    dirs.push(PathBuf::from(SYSTEM_PLUGIN_DIR));
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

/// Resolves a `--plugin` argument to a file, or says where it looked.
pub fn resolve(spec: &str) -> Result<PathBuf, String> {
    if spec.is_empty() {
        return Err("empty plugin name".into());
    }
    if spec.contains('/') {
        let p = PathBuf::from(spec);
        return if p.exists() {
            Ok(p)
        } else {
            Err(format!("plugin {spec}: no such file"))
        };
    }
    let file = file_name(spec);
    let dirs = search_path();
    for dir in &dirs {
        let candidate = dir.join(&file);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    let looked: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    Err(format!("plugin {spec}: no {file} in {}", looked.join(", ")))
}

/// Every `lib*.so` on the search path (first occurrence of a file name wins).
pub fn find_plugins() -> Vec<PathBuf> {
    let mut seen = std::collections::HashSet::new();
    let mut found = Vec::new();
    for dir in search_path() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
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
            .contains("no such file"));
        let e = resolve("no-such-plugin-xyz").unwrap_err();
        assert!(
            e.contains("libno_such_plugin_xyz.so") && e.contains(SYSTEM_PLUGIN_DIR),
            "{e}"
        );
    }
}
