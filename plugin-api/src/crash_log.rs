//! A redo log for metadata a plugin keeps in memory, so that a crash of the host process
//! (kill -9, a panic that aborts, an OOM kill) costs no acknowledged write.
//!
//! # Why
//!
//! A plugin that caches metadata and writes it back only at a flush (qcow2's L2 tables and
//! refcounts, a copy-on-write bitmap) loses the writes it acknowledged since the last flush
//! when its process dies, even though their data already reached the page cache. The guest
//! was never promised those writes would survive a power loss, but it was promised they
//! would survive anything short of one: `serve --state-dir` takes a dead backend's disks
//! over without the guest noticing, and a write the guest saw succeed must still read back.
//!
//! # How
//!
//! Before answering a request that changed cached metadata, the plugin appends what it
//! changed to this log with [`CrashLog::append`]: one `write` to a file under
//! [`state_dir`], which `serve` puts on a tmpfs (`/run/xen-disk` by default). A process's
//! death cannot take that file; a power loss takes it together with the page cache whose
//! data it describes, so the image's own crash-safety story is unchanged. When the plugin
//! has written its metadata back and synced it, it drops the records ([`CrashLog::clear`],
//! or [`CrashLog::begin_checkpoint`] and [`CrashLog::end_checkpoint`] when appends go on
//! during the writeback). When a process opens the image next, [`CrashLog::open`] hands it
//! the records a dead process left, to apply before anything else.
//!
//! A record is a class (the plugin's own ordering, for example "refcounts before
//! pointers"), a number (usually a file offset) and bytes. Records are replayed in the order
//! they were appended, so a later record for the same place wins. A record whose append
//! was cut short by the process's death fails its checksum and ends the log: the request
//! it belonged to was never answered.
//!
//! The log is keyed by the image file's device and inode, and held with an exclusive
//! `flock` for as long as it is open: a second process opening the same image for writing
//! gets an error naming the log instead of two writers on one image. The kernel drops the
//! lock when its holder dies.
//!
//! ```no_run
//! # use xen_disk_plugin_api::crash_log::{self, CrashLog, Record};
//! # fn main() -> xen_disk_plugin_api::Result<()> {
//! let image = std::fs::OpenOptions::new().read(true).write(true).open("disk.img").unwrap();
//! if let Some(dir) = crash_log::state_dir() {
//!     let (log, left) = CrashLog::open(&dir, "myformat", &image, "disk.img")?;
//!     for r in left {
//!         // Apply r.data at r.at, by class; sync; then forget them:
//!     }
//!     log.clear()?;
//!     // ... after each metadata change, before answering:
//!     log.append(&[Record { class: 0, at: 4096, data: vec![1, 2, 3, 4] }])?;
//! }
//! # Ok(()) }
//! ```

use crate::{Error, ErrorKind, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The variable through which the host tells plugins where state that must outlive the
/// process (but not a reboot) may go. `serve` sets it to its `--state-dir` when it keeps
/// journals; unset means nobody will take the disks over after a crash.
pub const STATE_DIR_ENV: &str = "XEN_DISK_STATE_DIR";

/// The directory named by [`STATE_DIR_ENV`], if set and not empty.
pub fn state_dir() -> Option<PathBuf> {
    std::env::var_os(STATE_DIR_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

const MAGIC: &[u8; 8] = b"XDCRASH1";
const HEADER_LEN: usize = 24;
/// Record framing: length (u32), class (u8), 3 bytes of zero, `at` (u64), data, checksum (u64).
const FRAME: usize = 4 + 4 + 8 + 8;
/// Larger records are refused on append and end the log on replay.
pub const MAX_RECORD: usize = 64 << 20;

/// One change a plugin made to its cached metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The plugin's own ordering class (for example 0 = refcounts, 2 = pointers).
    pub class: u8,
    /// Where it applies: a file offset, an index, whatever the plugin means.
    pub at: u64,
    /// The new bytes (may be empty when `at` says it all).
    pub data: Vec<u8>,
}

/// An open crash log, held exclusively by this process.
pub struct CrashLog {
    name: String,
    log_path: PathBuf,
    old_path: PathBuf,
    lock_path: PathBuf,
    id: (u64, u64),
    inner: Mutex<File>,
    _lock: File,
}

fn checksum(bytes: &[u8]) -> u64 {
    // FNV-1a: enough to tell a torn or stale tail from a whole record.
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn encode(records: &[Record], out: &mut Vec<u8>) {
    for r in records {
        let start = out.len();
        out.extend_from_slice(&(r.data.len() as u32).to_le_bytes());
        out.extend_from_slice(&[r.class, 0, 0, 0]);
        out.extend_from_slice(&r.at.to_le_bytes());
        out.extend_from_slice(&r.data);
        let sum = checksum(&out[start..]);
        out.extend_from_slice(&sum.to_le_bytes());
    }
}

/// The whole records at the start of `body`; the first damaged or torn one ends the list.
fn decode(body: &[u8]) -> Vec<Record> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while body.len() - pos >= FRAME {
        let len = u32::from_le_bytes(body[pos..pos + 4].try_into().unwrap_or([0; 4])) as usize;
        if len > MAX_RECORD || body.len() - pos - FRAME < len {
            break;
        }
        let end = pos + 16 + len;
        let sum = u64::from_le_bytes(body[end..end + 8].try_into().unwrap_or([0; 8]));
        if checksum(&body[pos..end]) != sum || body[pos + 5..pos + 8] != [0, 0, 0] {
            break;
        }
        out.push(Record {
            class: body[pos + 4],
            at: u64::from_le_bytes(body[pos + 8..pos + 16].try_into().unwrap_or([0; 8])),
            data: body[pos + 16..end].to_vec(),
        });
        pos = end + 8;
    }
    out
}

fn header(id: (u64, u64)) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&id.0.to_le_bytes());
    h[16..].copy_from_slice(&id.1.to_le_bytes());
    h
}

impl CrashLog {
    /// Opens (creating it if needed) the log of `image` under `dir/plugin/`, and returns the
    /// records a process that died with the image open left behind, oldest first. `name`
    /// names the image in errors. Fails if another live process holds the log, or if a log
    /// file is not one (wrong magic, another image's identity): the records could be
    /// anyone's, and applying them could damage the image.
    pub fn open(
        dir: &Path,
        plugin: &str,
        image: &File,
        name: &str,
    ) -> Result<(CrashLog, Vec<Record>)> {
        let meta = image
            .metadata()
            .map_err(|e| Error::io(e.raw_os_error().unwrap_or(5), format!("{name}: {e}")))?;
        let id = (meta.dev(), meta.ino());
        let sub = dir.join(plugin);
        let io = |what: &Path, e: std::io::Error| {
            Error::io(
                e.raw_os_error().unwrap_or(5),
                format!("{name}: crash log {}: {e}", what.display()),
            )
        };
        std::fs::create_dir_all(&sub).map_err(|e| io(&sub, e))?;
        let stem = format!("{:x}-{:x}", id.0, id.1);
        let lock_path = sub.join(format!("{stem}.lock"));
        let log_path = sub.join(format!("{stem}.log"));
        let old_path = sub.join(format!("{stem}.old"));
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io(&lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::new(
                    ErrorKind::Other,
                    format!(
                        "{name}: the image is open for writing elsewhere (in this process or another: its crash log {} is locked)",
                        lock_path.display()
                    ),
                ))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(&lock_path, e)),
        }
        let mut left = Vec::new();
        for path in [&old_path, &log_path] {
            let mut bytes = Vec::new();
            match File::open(path) {
                Ok(mut f) => f.read_to_end(&mut bytes).map_err(|e| io(path, e))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io(path, e)),
            };
            if bytes.is_empty() {
                continue; // created, then the process died before the header went in
            }
            if bytes.len() < HEADER_LEN || bytes[..HEADER_LEN] != header(id) {
                return Err(Error::corrupt(format!(
                    "{name}: crash log {} is not this image's (bad magic or identity); move it away to open the image without it",
                    path.display()
                )));
            }
            left.extend(decode(&bytes[HEADER_LEN..]));
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| io(&log_path, e))?;
        let log = CrashLog {
            name: name.to_string(),
            log_path,
            old_path,
            lock_path,
            id,
            inner: Mutex::new(file),
            _lock: lock,
        };
        if left.is_empty() {
            log.clear()?;
        }
        Ok((log, left))
    }

    /// [`CrashLog::open`], except that a log that cannot be made where none exists yet (a
    /// read-only or full state dir, no permission) is not an error: the image is served
    /// without one, and one warning line on stderr says what a crash would then cost. A
    /// log that exists but cannot be read, is not this image's, or is held by another
    /// writer is still an error: its records are acknowledged writes.
    pub fn open_or_warn(
        dir: &Path,
        plugin: &str,
        image: &File,
        name: &str,
    ) -> Result<Option<(CrashLog, Vec<Record>)>> {
        match CrashLog::open(dir, plugin, image, name) {
            Ok(opened) => Ok(Some(opened)),
            Err(e) if e.kind() == ErrorKind::Io && !Self::has_records(dir, plugin, image) => {
                eprintln!(
                    "xen-disk: warning: {name}: no crash log under {} ({e}); served without one: a crash of the host would lose this image's writes since its last flush",
                    dir.join(plugin).display()
                );
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Whether a log of `image` with something in it is there.
    fn has_records(dir: &Path, plugin: &str, image: &File) -> bool {
        let Ok(meta) = image.metadata() else {
            return true;
        };
        let stem = format!("{:x}-{:x}", meta.dev(), meta.ino());
        ["log", "old"].iter().any(|ext| {
            std::fs::metadata(dir.join(plugin).join(format!("{stem}.{ext}")))
                .is_ok_and(|m| m.len() > HEADER_LEN as u64)
        })
    }

    fn io(&self, what: &Path, e: std::io::Error) -> Error {
        Error::io(
            e.raw_os_error().unwrap_or(5),
            format!("{}: crash log {}: {e}", self.name, what.display()),
        )
    }

    fn file(&self) -> std::sync::MutexGuard<'_, File> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The log file, for messages.
    pub fn path(&self) -> &Path {
        &self.log_path
    }

    /// Appends `records` with one write. Call it after the data they describe was written
    /// (to the page cache is enough) and before answering the request.
    pub fn append(&self, records: &[Record]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        if let Some(r) = records.iter().find(|r| r.data.len() > MAX_RECORD) {
            return Err(Error::msg(format!(
                "{}: crash log record of {} bytes is over the limit",
                self.name,
                r.data.len()
            )));
        }
        let mut buf = Vec::with_capacity(records.iter().map(|r| FRAME + r.data.len()).sum());
        encode(records, &mut buf);
        let mut f = self.file();
        f.write_all(&buf).map_err(|e| self.io(&self.log_path, e))
    }

    /// Drops every record: the plugin's metadata on the image is now what they describe,
    /// durably. The caller must keep appends out while it clears (for example by holding
    /// the lock its appends happen under).
    pub fn clear(&self) -> Result<()> {
        let f = self.file();
        f.set_len(0).map_err(|e| self.io(&self.log_path, e))?;
        (&*f)
            .write_all(&header(self.id))
            .map_err(|e| self.io(&self.log_path, e))?;
        remove_if_there(&self.old_path).map_err(|e| self.io(&self.old_path, e))
    }

    /// Sets the records appended so far aside, to be dropped by
    /// [`CrashLog::end_checkpoint`] once the metadata they describe is durable; records
    /// appended meanwhile stay. Take the snapshot of what you will write back *after* this
    /// call, so that every record set aside describes a change in it.
    pub fn begin_checkpoint(&self) -> Result<()> {
        let mut f = self.file();
        if self.old_path.exists() {
            // An earlier writeback failed: keep its records and add these.
            let mut bytes = Vec::new();
            File::open(&self.log_path)
                .and_then(|mut l| l.read_to_end(&mut bytes))
                .map_err(|e| self.io(&self.log_path, e))?;
            let body = bytes.get(HEADER_LEN..).unwrap_or(&[]);
            OpenOptions::new()
                .append(true)
                .open(&self.old_path)
                .and_then(|mut o| o.write_all(body))
                .map_err(|e| self.io(&self.old_path, e))?;
            f.set_len(0).map_err(|e| self.io(&self.log_path, e))?;
        } else {
            std::fs::rename(&self.log_path, &self.old_path)
                .map_err(|e| self.io(&self.log_path, e))?;
            *f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log_path)
                .map_err(|e| self.io(&self.log_path, e))?;
        }
        f.write_all(&header(self.id))
            .map_err(|e| self.io(&self.log_path, e))
    }

    /// Drops the records set aside by [`CrashLog::begin_checkpoint`]: what they describe
    /// is durable on the image now.
    pub fn end_checkpoint(&self) -> Result<()> {
        let _f = self.file();
        remove_if_there(&self.old_path).map_err(|e| self.io(&self.old_path, e))
    }

    /// Closes the log and removes its files: call it once everything was written back and
    /// synced (a clean close). Dropping without it keeps the files for the next open.
    pub fn remove(self) -> Result<()> {
        for p in [&self.old_path, &self.log_path, &self.lock_path] {
            remove_if_there(p).map_err(|e| self.io(p, e))?;
        }
        Ok(())
    }
}

fn remove_if_there(p: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn dir(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("crash-log-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
    fn rec(class: u8, at: u64, data: &[u8]) -> Record {
        Record {
            class,
            at,
            data: data.to_vec(),
        }
    }
    fn image(d: &Dir) -> File {
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(d.0.join("img"))
            .unwrap()
    }

    #[test]
    fn records_outlive_the_log_and_come_back_in_order() {
        let d = dir("order");
        let img = image(&d);
        let (log, left) = CrashLog::open(&d.0, "t", &img, "img").unwrap();
        assert!(left.is_empty());
        log.append(&[rec(0, 1, b"a"), rec(2, 9, b"")]).unwrap();
        log.append(&[rec(1, u64::MAX, &[7; 300])]).unwrap();
        drop(log); // as a dead process would leave it
        let (log, left) = CrashLog::open(&d.0, "t", &img, "img").unwrap();
        assert_eq!(
            left,
            vec![rec(0, 1, b"a"), rec(2, 9, b""), rec(1, u64::MAX, &[7; 300])]
        );
        log.clear().unwrap();
        drop(log);
        let (log, left) = CrashLog::open(&d.0, "t", &img, "img").unwrap();
        assert!(left.is_empty());
        log.remove().unwrap();
        assert_eq!(std::fs::read_dir(d.0.join("t")).unwrap().count(), 0);
    }

    #[test]
    fn a_torn_tail_ends_the_log_at_the_last_whole_record() {
        let d = dir("torn");
        let img = image(&d);
        let (log, _) = CrashLog::open(&d.0, "t", &img, "img").unwrap();
        log.append(&[rec(0, 1, b"whole")]).unwrap();
        log.append(&[rec(0, 2, b"torn record")]).unwrap();
        let path = log.log_path.clone();
        drop(log);
        let full = std::fs::read(&path).unwrap();
        for cut in HEADER_LEN..full.len() {
            std::fs::write(&path, &full[..cut]).unwrap();
            let (_log, left) = CrashLog::open(&d.0, "t", &img, "img").unwrap();
            let whole = cut >= HEADER_LEN + FRAME + 5;
            assert_eq!(left.len(), usize::from(whole), "cut at {cut}");
        }
        // A flipped byte anywhere in the second record drops it, never the first.
        for i in HEADER_LEN + FRAME + 5..full.len() {
            let mut b = full.clone();
            b[i] ^= 0x40;
            std::fs::write(&path, &b).unwrap();
            let (_log, left) = CrashLog::open(&d.0, "t", &img, "img").unwrap();
            assert_eq!(left, vec![rec(0, 1, b"whole")], "flip at {i}");
        }
    }

    #[test]
    fn a_second_writer_and_a_foreign_log_are_refused_by_name() {
        let d = dir("refuse");
        let img = image(&d);
        let (log, _) = CrashLog::open(&d.0, "t", &img, "img").unwrap();
        let e = CrashLog::open(&d.0, "t", &img, "img").err().unwrap();
        assert!(e.to_string().contains("open for writing elsewhere"), "{e}");
        let path = log.log_path.clone();
        drop(log);
        let mut b = std::fs::read(&path).unwrap();
        b[12] ^= 1; // another inode
        std::fs::write(&path, &b).unwrap();
        let e = CrashLog::open(&d.0, "t", &img, "img").err().unwrap();
        assert!(e.to_string().contains("not this image's"), "{e}");
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    }

    #[test]
    fn a_state_dir_that_cannot_take_a_log_is_a_warning_unless_records_wait() {
        let d = dir("nolog");
        let img = image(&d);
        // A file where the plugin's directory should be: nothing can be made under it.
        std::fs::write(d.0.join("t"), b"").unwrap();
        assert!(CrashLog::open(&d.0, "t", &img, "img").is_err());
        assert!(CrashLog::open_or_warn(&d.0, "t", &img, "img")
            .unwrap()
            .is_none());
        // With records waiting, a log that cannot be opened is an error.
        std::fs::remove_file(d.0.join("t")).unwrap();
        let (log, _) = CrashLog::open(&d.0, "t", &img, "img").unwrap();
        log.append(&[rec(0, 1, b"x")]).unwrap();
        let lock = log.lock_path.clone();
        drop(log);
        std::fs::remove_file(&lock).unwrap();
        std::fs::create_dir(&lock).unwrap(); // the lock cannot be opened now
        assert!(CrashLog::open_or_warn(&d.0, "t", &img, "img").is_err());
    }

    #[test]
    fn a_checkpoint_drops_only_what_was_set_aside() {
        let d = dir("ckpt");
        let img = image(&d);
        let (log, _) = CrashLog::open(&d.0, "t", &img, "img").unwrap();
        log.append(&[rec(0, 1, b"before")]).unwrap();
        log.begin_checkpoint().unwrap();
        log.append(&[rec(0, 2, b"during")]).unwrap();
        drop(log); // died before the writeback finished: both come back, oldest first
        let (log, left) = CrashLog::open(&d.0, "t", &img, "img").unwrap();
        assert_eq!(left, vec![rec(0, 1, b"before"), rec(0, 2, b"during")]);
        // A failed writeback leaves its records set aside; the next checkpoint adds to them.
        log.begin_checkpoint().unwrap();
        log.append(&[rec(0, 3, b"later")]).unwrap();
        log.begin_checkpoint().unwrap();
        log.append(&[rec(0, 4, b"last")]).unwrap();
        drop(log);
        let (log, left) = CrashLog::open(&d.0, "t", &img, "img").unwrap();
        let ats: Vec<u64> = left.iter().map(|r| r.at).collect();
        assert_eq!(ats, vec![1, 2, 3, 4]);
        log.begin_checkpoint().unwrap();
        log.append(&[rec(0, 5, b"after")]).unwrap();
        log.end_checkpoint().unwrap();
        drop(log);
        let (_log, left) = CrashLog::open(&d.0, "t", &img, "img").unwrap();
        assert_eq!(left, vec![rec(0, 5, b"after")]);
    }
}
