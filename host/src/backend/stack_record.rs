//! What a journaled device serves when it is no longer what its `params` (or disks.toml)
//! say, kept beside its journal so that a `serve` taking the device over after a crash
//! serves the same disk the guest was writing to.
//!
//! Two records, each a small TOML file next to the journal `<dir>/vbd3-<guest>-<devid>.journal`:
//! - `<journal>.stack`, written by `ctl swap`: the plugin and `key=value` pairs swapped in.
//!   It is written *before* the swap (a crash between the two reopens the new plugin, which
//!   the guest had not written to yet: nothing acknowledged is on the old one only) and
//!   put back as it was if the swap fails.
//! - `<journal>.snapshot`, written by `ctl snapshot` before the freeze: the overlay file the
//!   guest's writes go to while a backup runs (in the state dir unless `-c overlay=` says
//!   otherwise, so it outlives the process). `ctl commit` removes it during its final pause,
//!   after the base is flushed and before the guest writes to the base again. A `serve`
//!   taking the device over with the record present writes the overlay's granules into the
//!   base, flushes, and removes the record and the overlay: the guest's writes since the
//!   snapshot are all there, and the backup's export (which died with the process) is gone.
//!
//! Both go when the device is removed (the next attach is a new device, from `params`).

use crate::plugin::GuardedDisk;
use std::path::{Path, PathBuf};
use toml::Table;
use xen_disk_plugin_api::with_write_bufs;

fn with_suffix(journal: &Path, suffix: &str) -> PathBuf {
    let mut p = journal.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// The swapped-in stack's record.
pub fn stack_path(journal: &Path) -> PathBuf {
    with_suffix(journal, ".stack")
}

/// The open snapshot's record.
pub fn snapshot_path(journal: &Path) -> PathBuf {
    with_suffix(journal, ".snapshot")
}

/// Where a snapshot's overlay goes when the command line names none.
pub fn default_overlay(journal: &Path) -> PathBuf {
    with_suffix(journal, ".snapshot.cow")
}

/// A plugin and its `key=value` pairs, as `ctl swap` was given them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stack {
    pub plugin: String,
    pub pairs: Vec<String>,
}

fn write_atomically(path: &Path, text: &str) -> Result<(), String> {
    let tmp = with_suffix(path, ".new");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn read_table(path: &Path) -> Result<Option<Table>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => text
            .parse::<Table>()
            .map(Some)
            .map_err(|e| format!("{}: {}", path.display(), e.message())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

fn remove(path: &Path) -> Result<(), String> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(format!("{}: {e}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Records the stack a swap is about to plug in.
pub fn write_stack(journal: &Path, stack: &Stack) -> Result<(), String> {
    let mut t = Table::new();
    t.insert("plugin".into(), stack.plugin.clone().into());
    t.insert(
        "config".into(),
        toml::Value::Array(stack.pairs.iter().map(|p| p.clone().into()).collect()),
    );
    write_atomically(&stack_path(journal), &t.to_string())
}

/// The recorded stack, if a swap left one. A damaged record is an error naming the file.
pub fn read_stack(journal: &Path) -> Result<Option<Stack>, String> {
    let path = stack_path(journal);
    let Some(t) = read_table(&path)? else {
        return Ok(None);
    };
    let bad = |key: &str| {
        format!(
            "{}: key `{key}` missing or not what a swap writes",
            path.display()
        )
    };
    let plugin = t
        .get("plugin")
        .and_then(|v| v.as_str())
        .ok_or_else(|| bad("plugin"))?;
    let pairs = t
        .get("config")
        .and_then(|v| v.as_array())
        .ok_or_else(|| bad("config"))?
        .iter()
        .map(|v| v.as_str().map(str::to_string).ok_or_else(|| bad("config")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(Stack {
        plugin: plugin.to_string(),
        pairs,
    }))
}

/// Puts the stack record back as it was before a swap that failed.
pub fn restore_stack(journal: &Path, before: Option<&Stack>) -> Result<(), String> {
    match before {
        Some(s) => write_stack(journal, s),
        None => remove(&stack_path(journal)),
    }
}

/// Records the overlay of a snapshot about to be taken.
pub fn write_snapshot(journal: &Path, overlay: &Path) -> Result<(), String> {
    let mut t = Table::new();
    t.insert("overlay".into(), overlay.display().to_string().into());
    write_atomically(&snapshot_path(journal), &t.to_string())
}

/// The open snapshot's overlay, if one is recorded.
pub fn read_snapshot(journal: &Path) -> Result<Option<PathBuf>, String> {
    let path = snapshot_path(journal);
    let Some(t) = read_table(&path)? else {
        return Ok(None);
    };
    t.get("overlay")
        .and_then(|v| v.as_str())
        .map(|s| Some(PathBuf::from(s)))
        .ok_or_else(|| format!("{}: key `overlay` missing or not a path", path.display()))
}

/// Forgets the snapshot (committed or dropped); its overlay file goes too when it is the
/// one this module placed.
pub fn remove_snapshot(journal: &Path) -> Result<(), String> {
    remove(&snapshot_path(journal))?;
    remove(&default_overlay(journal))
}

/// Forgets both records: the device is gone.
pub fn remove_all(journal: &Path) {
    let _ = remove(&stack_path(journal));
    let _ = remove_snapshot(journal);
}

/// For a device being taken over, once its disk is open: writes the granules of a snapshot
/// the dead process left open into `disk`, flushes, and forgets the snapshot. Returns how
/// many granules went down, or None when no snapshot was open.
pub fn commit_left_snapshot(journal: &Path, disk: &GuardedDisk) -> Result<Option<u64>, String> {
    let Some(overlay_path) = read_snapshot(journal)? else {
        return Ok(None);
    };
    let name = overlay_path.display().to_string();
    if !overlay_path.exists() {
        // Recorded, then the process died before the overlay was made: nothing was written.
        remove_snapshot(journal)?;
        return Ok(Some(0));
    }
    let overlay = ::cow::overlay::Overlay::open_file(&overlay_path).map_err(|e| e.to_string())?;
    let h = *overlay.header();
    let base = disk.current();
    let info = base.info();
    if info.size != h.base_size {
        return Err(format!(
            "{name}: the snapshot's overlay is over a {}-byte disk, the device's is {} bytes",
            h.base_size, info.size
        ));
    }
    let n = overlay
        .copy_granules(|start, bytes| {
            with_write_bufs(&[bytes], |b| base.write(start, b))
                .map_err(|e| e.context(format!("{name}: commit into the disk at {start}")))
        })
        .map_err(|e| e.to_string())?;
    if info.can_flush {
        base.flush()
            .map_err(|e| format!("{name}: commit: flush: {e}"))?;
    }
    drop(overlay);
    remove_snapshot(journal)?;
    if overlay_path != default_overlay(journal) {
        remove(&overlay_path)?;
    }
    Ok(Some(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_damage_is_named() {
        let d = std::env::temp_dir().join(format!("stack-record-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let j = d.join("vbd3-1-51728.journal");
        assert_eq!(read_stack(&j).unwrap(), None);
        let s = Stack {
            plugin: "qcow2".into(),
            pairs: vec!["path=/a b/\"x\".qcow2".into(), "readonly=false".into()],
        };
        write_stack(&j, &s).unwrap();
        assert_eq!(read_stack(&j).unwrap(), Some(s.clone()));
        restore_stack(&j, None).unwrap();
        assert_eq!(read_stack(&j).unwrap(), None);
        std::fs::write(stack_path(&j), "plugin = 3\nconfig = []\n").unwrap();
        let e = read_stack(&j).unwrap_err();
        assert!(e.contains(".stack") && e.contains("`plugin`"), "{e}");
        std::fs::write(stack_path(&j), "plugin = \"x\"\nconfig = [\n").unwrap();
        assert!(read_stack(&j).unwrap_err().contains(".stack"));
        write_snapshot(&j, &default_overlay(&j)).unwrap();
        assert_eq!(read_snapshot(&j).unwrap(), Some(default_overlay(&j)));
        std::fs::write(default_overlay(&j), b"x").unwrap();
        remove_snapshot(&j).unwrap();
        assert_eq!(read_snapshot(&j).unwrap(), None);
        assert!(!default_overlay(&j).exists());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
