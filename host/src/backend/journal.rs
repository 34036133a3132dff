//! The ring journal: what a device's backend must remember outside its own process, so that
//! the next `serve` can take the device over after a crash, a `kill -9` or an upgrade,
//! without losing a request or answering one twice (`docs/protocol.md#recovery`).
//!
//! The ring alone cannot say which requests were taken and not answered: responses go out
//! in any order, and each one overwrites the slot of a request already consumed. So each
//! ring keeps, in a small shared file mapped into the process, its consumer index and a
//! copy of every request it took and has not yet published an answer for.
//!
//! ```text
//!  take:    copy the entry into a free record, record Taken ─▶ req_cons (journal) ─▶ serve it
//!  answer:  record Answering at response index R ─▶ response into the ring at R
//!  publish: rsp_prod (ring) ─▶ the records answered in the batch go back to Free
//!  recover: Taken, or Answering at R ≥ rsp_prod ─▶ served again and answered once;
//!           Answering at R < rsp_prod ─▶ the guest has its answer: forgotten
//! ```
//!
//! Every step is one store that either happened or did not when the process died (stores to
//! a shared mapping survive the process; they are ordered by Release stores). The file lives
//! on tmpfs (`/run`): nothing is synced, since a host that loses its memory loses its guests
//! too. The owner holds an exclusive `flock` on it; the kernel drops the lock when the
//! process dies, which is how a new process tells a dead backend from a live one.
//!
//! Layout (little-endian), one file per device:
//!
//! ```text
//!  header   0 magic "XDJRNL\0\1"   8 version   12 queues   16 guest domid   20 device id
//!           24 owner's pid (for messages)                                  (64 bytes)
//!  queue    0 ring entries   4 protocol   8 event channel   12 ring pages   16 req_cons
//!           32 ring refs [16]                                             (128 bytes)
//!  record   0 state (0 free, 1 taken, 2 answering)   4 ring index taken from
//!           8 response index   16 the request's entry (112 bytes)   (128 bytes each, two
//!           per ring entry)
//! ```
//!
//! Everything read back is checked: a journal is a file anyone with access to the state
//! directory could have written, and a wrong one must cost its device, never the process.

use crate::blkif::abi::{Protocol, MAX_ENTRY_SIZE};
use crate::blkif::ring::RingLog;
use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

const MAGIC: [u8; 8] = *b"XDJRNL\0\x01";
const VERSION: u32 = 1;
const HEADER: usize = 64;
const QUEUE_HEADER: usize = 128;
const RECORD: usize = 128;
const ENTRY_AT: usize = 16;
/// The most ring entries a journal holds (a 16-page ring has 512).
pub const MAX_ENTRIES: u32 = 512;
/// The most queues a journal holds.
pub const MAX_QUEUES: u32 = 64;
/// The most ring pages per queue.
const MAX_REFS: usize = 16;

const FREE: u32 = 0;
const TAKEN: u32 = 1;
const ANSWERING: u32 = 2;

/// Where serve keeps its journals unless told otherwise.
pub const DEFAULT_STATE_DIR: &str = "/run/xen-disk";

/// The journal of the device at `backend_path` (`.../vbd3/<guest>/<devid>`) in `dir`.
pub fn journal_path(dir: &Path, guest: u32, devid: u32) -> PathBuf {
    dir.join(format!("vbd3-{guest}-{devid}.journal"))
}

/// Why a journal could not be made, opened or used.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The file could not be opened, sized or mapped.
    #[error("journal {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// A live process holds it: that backend still serves the device.
    #[error("journal {path}: held by a running backend")]
    Busy {
        /// The file.
        path: PathBuf,
    },
    /// The file is not a journal this version can trust.
    #[error("journal {path}: {what}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the field.
        what: String,
    },
    /// It is a journal, of another connection than the one the guest describes now.
    #[error("journal {path}: {what}")]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// What differs.
        what: String,
    },
}

/// What identifies one ring of a connection: the journal must describe the same one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingIdentity {
    /// Entries in the ring.
    pub entries: u32,
    /// The layout.
    pub protocol: Protocol,
    /// The frontend's event channel port.
    pub event_channel: u32,
    /// The ring pages' grant references.
    pub ring_refs: Vec<u32>,
}

/// The file, locked, and its mapping; unmapped and unlocked when the last user goes.
struct Mapping {
    ptr: *mut u8,
    len: usize,
    _file: File,
}

// SAFETY: the mapping is plain shared memory. Each queue's section is written by that
// queue's ring thread only (one RingJournal per section), the header only before the rings
// start; every field is accessed through atomics or byte copies, never through references
// that could alias a concurrent writer.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are the mapping made in `map`; no RingJournal outlives the Arc.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

impl Mapping {
    fn u32_at(&self, at: usize) -> &AtomicU32 {
        assert!(at + 4 <= self.len && at.is_multiple_of(4));
        // SAFETY: inside the mapping (checked), 4-aligned (the mapping is page-aligned);
        // AtomicU32 has u32's layout.
        unsafe { &*(self.ptr.add(at) as *const AtomicU32) }
    }

    fn get(&self, at: usize) -> u32 {
        self.u32_at(at).load(Ordering::Acquire)
    }

    /// A Release store: every store before it in this thread is in the mapping first.
    fn set(&self, at: usize, v: u32) {
        self.u32_at(at).store(v, Ordering::Release)
    }

    fn copy_in(&self, at: usize, bytes: &[u8]) {
        assert!(at + bytes.len() <= self.len);
        // SAFETY: inside the mapping (checked); the section is this thread's alone.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(at), bytes.len()) };
    }

    fn copy_out(&self, at: usize, out: &mut [u8]) {
        assert!(at + out.len() <= self.len);
        // SAFETY: inside the mapping (checked).
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(at), out.as_mut_ptr(), out.len()) };
    }

    fn bytes(&self, at: usize, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.copy_out(at, &mut v);
        v
    }
}

/// Records per ring: twice its entries. A ring has at most `entries` requests taken and
/// not answered, and at most `entries` answered and not yet published (the ring thread
/// takes new requests between queueing answers and publishing them), each holding a record.
fn records(entries: u32) -> u32 {
    2 * entries
}

fn section_len(entries: u32) -> usize {
    QUEUE_HEADER + records(entries) as usize * RECORD
}

fn protocol_code(p: Protocol) -> u32 {
    match p {
        Protocol::X86_64 => 0,
        Protocol::X86_32 => 1,
    }
}

/// One device's journal, held (locked) by this process.
pub struct Journal {
    path: PathBuf,
    map: Arc<Mapping>,
    /// Where each queue's section starts, and its identity.
    queues: Vec<(usize, RingIdentity)>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("path", &self.path).finish()
    }
}

/// Opens `path` read-write (creating it if asked) and takes its lock without waiting.
fn open_locked(path: &Path, create: bool) -> Result<File, JournalError> {
    let io = |source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(path)
        .map_err(io)?;
    // SAFETY: a valid descriptor; flock has no memory effects.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            JournalError::Busy {
                path: path.to_path_buf(),
            }
        } else {
            io(e)
        });
    }
    Ok(file)
}

fn map(path: &Path, file: File, len: usize) -> Result<Arc<Mapping>, JournalError> {
    // SAFETY: a fresh shared mapping of `len` bytes of a file at least that long; the
    // pointer is only used through Mapping.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(JournalError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(Arc::new(Mapping {
        ptr: ptr.cast(),
        len,
        _file: file,
    }))
}

/// Whether a live process holds the journal at `path` (false when there is none).
pub fn is_held(path: &Path) -> bool {
    matches!(open_locked(path, false), Err(JournalError::Busy { .. }))
}

impl Journal {
    /// Starts a fresh journal for a new connection (replacing whatever the file held): no
    /// request taken yet, each ring's consumer index at `start` (its `rsp_prod`).
    pub fn create(
        path: &Path,
        guest: u32,
        devid: u32,
        rings: &[(RingIdentity, u32)],
    ) -> Result<Journal, JournalError> {
        let bad = |what: String| JournalError::Corrupt {
            path: path.to_path_buf(),
            what,
        };
        if rings.is_empty() || rings.len() > MAX_QUEUES as usize {
            return Err(bad(format!("{} queues (1 to {MAX_QUEUES})", rings.len())));
        }
        for (r, _) in rings {
            if !r.entries.is_power_of_two()
                || r.entries > MAX_ENTRIES
                || r.ring_refs.is_empty()
                || r.ring_refs.len() > MAX_REFS
            {
                return Err(bad(format!(
                    "a ring of {} entries over {} pages cannot be journaled",
                    r.entries,
                    r.ring_refs.len()
                )));
            }
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| JournalError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        }
        let file = open_locked(path, true)?;
        let len = HEADER
            + rings
                .iter()
                .map(|(r, _)| section_len(r.entries))
                .sum::<usize>();
        let sized = file.set_len(0).and_then(|()| file.set_len(len as u64));
        sized.map_err(|source| JournalError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let map = map(path, file, len)?;
        map.copy_in(0, &MAGIC);
        map.set(8, VERSION);
        map.set(12, rings.len() as u32);
        map.set(16, guest);
        map.set(20, devid);
        map.set(24, std::process::id());
        let mut queues = Vec::new();
        let mut at = HEADER;
        for (r, start) in rings {
            map.set(at, r.entries);
            map.set(at + 4, protocol_code(r.protocol));
            map.set(at + 8, r.event_channel);
            map.set(at + 12, r.ring_refs.len() as u32);
            map.set(at + 16, *start);
            for (i, g) in r.ring_refs.iter().enumerate() {
                map.set(at + 32 + 4 * i, *g);
            }
            queues.push((at, r.clone()));
            at += section_len(r.entries);
        }
        Ok(Journal {
            path: path.to_path_buf(),
            map,
            queues,
        })
    }

    /// Opens the journal a dead backend left, checking every field, and that it describes
    /// the connection the guest describes now (`rings`, from its xenstore keys).
    pub fn open(
        path: &Path,
        guest: u32,
        devid: u32,
        rings: &[RingIdentity],
    ) -> Result<Journal, JournalError> {
        let bad = |what: String| JournalError::Corrupt {
            path: path.to_path_buf(),
            what,
        };
        let other = |what: String| JournalError::Mismatch {
            path: path.to_path_buf(),
            what,
        };
        let file = open_locked(path, false)?;
        let len = file
            .metadata()
            .map_err(|source| JournalError::Io {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        if len < HEADER as u64
            || len > (HEADER + MAX_QUEUES as usize * section_len(MAX_ENTRIES)) as u64
        {
            return Err(bad(format!("{len} bytes is not a journal's size")));
        }
        let map = map(path, file, len as usize)?;
        if map.bytes(0, 8) != MAGIC {
            return Err(bad("no journal magic at its start".into()));
        }
        if map.get(8) != VERSION {
            return Err(bad(format!(
                "version {} (this backend reads {VERSION})",
                map.get(8)
            )));
        }
        let count = map.get(12);
        if count == 0 || count > MAX_QUEUES {
            return Err(bad(format!("queues = {count} (1 to {MAX_QUEUES})")));
        }
        if (map.get(16), map.get(20)) != (guest, devid) {
            return Err(other(format!(
                "written for device {}/{}, not {guest}/{devid}",
                map.get(16),
                map.get(20)
            )));
        }
        if count as usize != rings.len() {
            return Err(other(format!(
                "{count} queue(s) journaled, the guest has {}",
                rings.len()
            )));
        }
        let mut queues = Vec::new();
        let mut at = HEADER;
        for (q, want) in rings.iter().enumerate() {
            if at + QUEUE_HEADER > map.len {
                return Err(bad(format!("queue {q}: the file ends in its header")));
            }
            let entries = map.get(at);
            if !entries.is_power_of_two() || entries > MAX_ENTRIES {
                return Err(bad(format!("queue {q}: entries = {entries}")));
            }
            if at + section_len(entries) > map.len {
                return Err(bad(format!("queue {q}: the file ends in its records")));
            }
            let protocol = match map.get(at + 4) {
                0 => Protocol::X86_64,
                1 => Protocol::X86_32,
                p => return Err(bad(format!("queue {q}: protocol = {p}"))),
            };
            let pages = map.get(at + 12) as usize;
            if pages == 0 || pages > MAX_REFS {
                return Err(bad(format!("queue {q}: ring pages = {pages}")));
            }
            let found = RingIdentity {
                entries,
                protocol,
                event_channel: map.get(at + 8),
                ring_refs: (0..pages).map(|i| map.get(at + 32 + 4 * i)).collect(),
            };
            if &found != want {
                return Err(other(format!(
                    "queue {q}: journaled {found:?}, the guest has {want:?}"
                )));
            }
            queues.push((at, found));
            at += section_len(entries);
        }
        if at != map.len {
            return Err(bad(format!("{} bytes where {at} were expected", map.len)));
        }
        map.set(24, std::process::id());
        Ok(Journal {
            path: path.to_path_buf(),
            map,
            queues,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queue `index`'s part, for its ring, with nothing in flight (a new connection).
    pub fn fresh_ring(&self, index: usize) -> RingJournal {
        RingJournal::new(
            self.map.clone(),
            self.queues[index].0,
            &self.queues[index].1,
        )
    }

    /// Queue `index`'s part after a crash, given the ring's shared indices now: which
    /// requests to serve again (those not answered where the guest can see it), and where
    /// to take new ones from (its `req_cons`).
    pub fn recover_ring(
        &self,
        index: usize,
        req_prod: u32,
        rsp_prod: u32,
    ) -> Result<(RingJournal, u32), JournalError> {
        let mut r = self.fresh_ring(index);
        r.recover(req_prod, rsp_prod)
            .map_err(|what| JournalError::Corrupt {
                path: self.path.clone(),
                what: format!("queue {index}: {what}"),
            })
            .map(|req_cons| (r, req_cons))
    }

    /// Deletes the file: the connection ended and nothing will take it over.
    pub fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One ring's section of a journal: owned by that ring (see [`RingLog`]).
pub struct RingJournal {
    map: Arc<Mapping>,
    /// Where the section starts.
    at: usize,
    entries: u32,
    free: Vec<u16>,
    /// The record holding each request in flight, by its id; requests sharing an id (a
    /// frontend reusing one while it is in flight) wait in `shared_ids`.
    by_id: HashMap<u64, u16>,
    shared_ids: Vec<(u64, u16)>,
    /// Answered, not yet published.
    unpushed: Vec<u16>,
    /// Taken before the crash and not answered: to serve again, in the order taken.
    replay: VecDeque<u16>,
    /// The record [`RingLog::replay`] handed out last, until its id is known.
    replayed: Option<u16>,
}

impl RingJournal {
    fn new(map: Arc<Mapping>, at: usize, id: &RingIdentity) -> RingJournal {
        let entries = id.entries;
        RingJournal {
            map,
            at,
            entries,
            free: (0..records(entries) as u16).rev().collect(),
            by_id: HashMap::with_capacity(entries as usize),
            shared_ids: Vec::new(),
            unpushed: Vec::with_capacity(entries as usize),
            replay: VecDeque::new(),
            replayed: None,
        }
    }

    fn record(&self, r: u16) -> usize {
        self.at + QUEUE_HEADER + usize::from(r) * RECORD
    }

    fn track(&mut self, r: u16, id: u64) {
        if let Some(prev) = self.by_id.insert(id, r) {
            self.shared_ids.push((id, prev));
        }
    }

    fn untrack(&mut self, id: u64) -> Option<u16> {
        let r = self.by_id.remove(&id)?;
        if let Some(i) = self.shared_ids.iter().position(|(s, _)| *s == id) {
            let (_, prev) = self.shared_ids.swap_remove(i);
            self.by_id.insert(id, prev);
        }
        Some(r)
    }

    /// The consumer index the journal holds.
    pub fn req_cons(&self) -> u32 {
        self.map.get(self.at + 16)
    }

    /// Reads the section back after a crash (see the module doc): returns `req_cons`, and
    /// queues the requests to serve again. Errors say which field is wrong.
    fn recover(&mut self, req_prod: u32, rsp_prod: u32) -> Result<u32, String> {
        let n = self.entries;
        let req_cons = self.req_cons();
        if req_cons.wrapping_sub(rsp_prod) > n || req_prod.wrapping_sub(req_cons) > n {
            return Err(format!(
                "req_cons {req_cons} is not between the ring's rsp_prod {rsp_prod} and req_prod {req_prod}"
            ));
        }
        let mut again = Vec::new();
        for r in 0..records(n) as u16 {
            let at = self.record(r);
            let (state, pos, answer) =
                (self.map.get(at), self.map.get(at + 4), self.map.get(at + 8));
            let keep = match state {
                FREE => false,
                // Taken before req_cons moved past it (its index is req_cons itself): the
                // ring still holds it, to be taken again as new. (A request in flight can be
                // any age: responses go out of order, so no window bounds its index.)
                TAKEN => pos != req_cons,
                // The answer went to index `answer`: published when below rsp_prod.
                ANSWERING if answer.wrapping_sub(rsp_prod) < n => true,
                ANSWERING if rsp_prod.wrapping_sub(answer).wrapping_sub(1) < n => false,
                ANSWERING => {
                    return Err(format!(
                        "record {r}: answered at ring index {answer}, far from rsp_prod {rsp_prod}"
                    ))
                }
                s => return Err(format!("record {r}: state = {s}")),
            };
            if keep {
                again.push((pos, r));
            } else if state != FREE {
                self.map.set(at, FREE);
            }
        }
        let in_flight = req_cons.wrapping_sub(rsp_prod);
        if again.len() as u32 != in_flight {
            return Err(format!(
                "{} request(s) journaled in flight, the ring says {in_flight} (req_cons {req_cons}, rsp_prod {rsp_prod})",
                again.len()
            ));
        }
        // In the order they were taken (a barrier stays behind what came before it).
        again.sort_by_key(|(pos, _)| pos.wrapping_sub(req_cons));
        for &(_, r) in &again {
            self.map.set(self.record(r), TAKEN);
            self.free.retain(|&f| f != r);
            self.replay.push_back(r);
        }
        Ok(req_cons)
    }
}

impl RingLog for RingJournal {
    fn taken(&mut self, pos: u32, entry: &[u8], id: u64) {
        let Some(r) = self.free.pop() else {
            // Impossible: a ring never has more requests in flight than entries. Then the
            // request is served unjournaled rather than not at all.
            debug_assert!(false, "journal full");
            return;
        };
        let at = self.record(r);
        let n = entry.len().min(MAX_ENTRY_SIZE);
        self.map.copy_in(at + ENTRY_AT, &entry[..n]);
        self.map.set(at + 4, pos);
        self.map.set(at, TAKEN);
        self.map.set(self.at + 16, pos.wrapping_add(1));
        self.track(r, id);
    }

    fn replay(&mut self, out: &mut [u8; MAX_ENTRY_SIZE]) -> bool {
        let Some(r) = self.replay.pop_front() else {
            return false;
        };
        self.map.copy_out(self.record(r) + ENTRY_AT, out);
        self.replayed = Some(r);
        true
    }

    fn replayed_id(&mut self, id: u64) {
        if let Some(r) = self.replayed.take() {
            self.track(r, id);
        }
    }

    fn waiting_replay(&self) -> u32 {
        self.replay.len() as u32
    }

    fn answering(&mut self, id: u64, rsp_pos: u32) {
        let Some(r) = self.untrack(id) else {
            return;
        };
        let at = self.record(r);
        self.map.set(at + 8, rsp_pos);
        self.map.set(at, ANSWERING);
        self.unpushed.push(r);
    }

    fn published(&mut self) {
        for i in 0..self.unpushed.len() {
            let r = self.unpushed[i];
            self.map.set(self.record(r), FREE);
            self.free.push(r);
        }
        self.unpushed.clear();
    }
}

#[cfg(test)]
#[path = "journal_tests.rs"]
mod tests;
