//! The NBD transmission phase spoken on the socket directly, once libnbd has connected and
//! negotiated (plain connections with simple replies: the default).
//!
//! Why not libnbd's own commands here: it reads each reply in two system calls (the 16-byte
//! header, then the data straight into the caller's buffer) and sends each command on the
//! calling thread under the handle's lock, which the reader holds while it reads. At 4 KiB
//! that is three system calls and often a lock hand-off per request. Here the reader takes
//! whatever the socket holds in one `recvmsg` (a burst of replies, the first one's data
//! landing straight in the guest's page, the rest in a staging buffer it then copies from), and
//! a command is one `sendmsg` of header and data under a lock only senders take. While every
//! reply due is a large read's, the reader takes each header alone instead, so that no read's
//! data goes through the staging buffer (see `LARGE_REPLY`).
//!
//! ```text
//!  request (28 bytes, big-endian): magic 0x25609513 | flags u16 | type u16 | cookie u64 | offset u64 | length u32
//!  simple reply (16 bytes):        magic 0x67446698 | error u32 | cookie u64   [+ length bytes of data for a read]
//! ```
//!
//! Commands in flight live in a table indexed by the low half of their cookie (the high half
//! is a generation, so a stray cookie is caught). A reply the table does not know, a bad
//! magic, or end of file kills the connection: every command in flight fails, and so does
//! every later one.

use crate::conn::Command;
use std::ffi::c_int;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const REQUEST_LEN: usize = 28;
const REPLY_LEN: usize = 16;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const FLAG_FUA: u16 = 1;

/// Bytes of replies taken from the socket per system call (beyond the first reply's data,
/// which goes straight to its buffer): 64 replies of 4 KiB.
const STAGE: usize = 256 << 10;

/// A read at least this long has a large reply. While only large replies are due, the
/// reader takes each reply's header alone, then its data straight into the read's buffer:
/// a burst into the staging buffer would take up to [`STAGE`] of the next read's data there,
/// to be copied again (about a fifth of every 1 MiB read, with a Unix socket handing over
/// some 200 KiB at a time), and one system call more per reply costs less than that copy.
const LARGE_REPLY: usize = 64 << 10;

/// Bytes one [`Reader::read`] takes at most (see [`Stop::Budget`]): a 1 MiB reply's worth.
const READ_BUDGET: usize = 1 << 20;

/// Whether `cmd`'s reply is small (anything but a read of [`LARGE_REPLY`] or more).
fn small_reply(cmd: &Command) -> bool {
    !matches!(cmd, Command::Read { len, .. } if *len >= LARGE_REPLY)
}

/// Who learns that a command completed, with its errno (0: success).
pub type Done = Box<dyn FnOnce(i32) + Send>;

/// A command in flight.
struct Entry {
    cookie: u64,
    cmd: Command,
    done: Done,
}

// SAFETY: the command's buffer is promised valid until `done` runs (Conn::start and
// start_async), on whichever thread completes it.
unsafe impl Send for Entry {}

struct Table {
    entries: Vec<Option<Entry>>,
    free: Vec<u32>,
    generation: u32,
    /// Set when the connection died: the errno every later command gets.
    dead: Option<i32>,
    /// Commands in `entries` whose reply is small ([`small_reply`]).
    small: usize,
}

/// The connection's transmission state.
pub struct Wire {
    fd: c_int,
    timeout: Duration,
    send: Mutex<()>,
    table: Mutex<Table>,
    /// Commands held back to go out together ([`Wire::submit`] with `hold`).
    held: Mutex<Held>,
}

/// Commands whose bytes wait for [`Wire::send_held`]: each a header and a write's data.
#[derive(Default)]
struct Held {
    headers: Vec<[u8; REQUEST_LEN]>,
    data: Vec<(*const u8, usize)>,
    /// The message's pieces, rebuilt at each send (kept: no allocation per pass).
    iov: Vec<libc::iovec>,
}

// SAFETY: the data pointers are commands' buffers, valid until the commands complete, which
// is after they are sent, whichever thread sends them.
unsafe impl Send for Held {}

/// At most this many commands are held back: then they go out at once.
const HOLD_MAX: usize = 64;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// An NBD error value as an errno (the protocol's values are Linux's; unknown ones are
/// EINVAL, as the protocol says).
fn nbd_errno(e: u32) -> i32 {
    match e {
        1 => libc::EPERM,
        5 => libc::EIO,
        12 => libc::ENOMEM,
        22 => libc::EINVAL,
        28 => libc::ENOSPC,
        75 => libc::EOVERFLOW,
        95 => libc::EOPNOTSUPP,
        108 => libc::ESHUTDOWN,
        _ => libc::EINVAL,
    }
}

/// The 28-byte request header.
fn request(kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> [u8; REQUEST_LEN] {
    let mut h = [0u8; REQUEST_LEN];
    h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&kind.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..28].copy_from_slice(&len.to_be_bytes());
    h
}

/// What a command puts on the wire: type, flags, offset, length, and the data sent after
/// the header (a write's).
fn encode(cmd: &Command) -> (u16, u16, u64, u64, Option<(*const u8, usize)>) {
    match *cmd {
        Command::Read { len, offset, .. } => (CMD_READ, 0, offset, len as u64, None),
        Command::Write {
            buf,
            len,
            offset,
            fua,
        } => (
            CMD_WRITE,
            if fua { FLAG_FUA } else { 0 },
            offset,
            len as u64,
            Some((buf, len)),
        ),
        Command::Flush => (CMD_FLUSH, 0, 0, 0, None),
        Command::Trim { offset, len } => (CMD_TRIM, 0, offset, len, None),
        Command::Zero { offset, len } => (CMD_WRITE_ZEROES, 0, offset, len, None),
    }
}

/// One parsed reply header.
#[derive(Debug, PartialEq, Eq)]
struct Reply {
    error: u32,
    cookie: u64,
}

/// Parses a simple reply header; `None` for a bad magic.
fn parse_reply(b: &[u8; REPLY_LEN]) -> Option<Reply> {
    let word = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    (word(0) == SIMPLE_REPLY_MAGIC).then(|| Reply {
        error: word(4),
        cookie: u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
    })
}

/// What a Unix socket may hold of our commands before `sendmsg` waits for the server: room
/// for a few 1 MiB writes at once. The kernel's default (`net.core.wmem_default`, about 208
/// KiB) holds a fifth of one, so the sender slept and woke several times per large write,
/// one connection at a time. The kernel caps it at `net.core.wmem_max`.
const UNIX_SEND_BUFFER: c_int = 4 << 20;

/// Raises a Unix socket's send buffer to [`UNIX_SEND_BUFFER`]. TCP sockets keep the kernel's
/// autotuning, which a fixed size would switch off. Best effort: the default still works.
fn widen_unix_send_buffer(fd: c_int) {
    // SAFETY: a zeroed sockaddr_storage is valid; fd is a socket we hold; len says the size.
    let family = unsafe {
        let mut addr: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        if libc::getsockname(
            fd,
            (&mut addr as *mut libc::sockaddr_storage).cast(),
            &mut len,
        ) < 0
        {
            return;
        }
        addr.ss_family
    };
    if c_int::from(family) != libc::AF_UNIX {
        return;
    }
    set_socket_int(fd, libc::SO_SNDBUF, UNIX_SEND_BUFFER);
}

/// Sets socket-level option `name` of socket `fd` to `value`; -1 (errno set) if refused.
fn set_socket_int(fd: c_int, name: c_int, value: c_int) -> c_int {
    // SAFETY: the option value is a c_int of the given size; a bad descriptor is an error.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            (&value as *const c_int).cast(),
            std::mem::size_of::<c_int>() as libc::socklen_t,
        )
    }
}

impl Wire {
    /// Takes over `fd` (a connected socket in the transmission phase, non-blocking; the
    /// caller keeps it open for as long as the Wire lives).
    pub fn new(fd: c_int, timeout: Duration) -> Wire {
        widen_unix_send_buffer(fd);
        Wire {
            fd,
            timeout,
            send: Mutex::new(()),
            table: Mutex::new(Table {
                entries: Vec::new(),
                free: Vec::new(),
                generation: 0,
                dead: None,
                small: 0,
            }),
            held: Mutex::default(),
        }
    }

    /// Sends `cmd`; `done` runs once with its errno when the reply comes (on the reader),
    /// or at once here when the connection is dead or the send fails (then `on_death` first
    /// learns why).
    ///
    /// With `hold`, the command's bytes wait with others for [`send_held`](Self::send_held)
    /// (or until `HOLD_MAX` wait): one system call, and one wake-up of the server, for a
    /// burst of commands.
    ///
    /// # Safety
    /// The command's buffer stays valid (a read's also untouched) until `done` runs.
    pub unsafe fn submit(
        &self,
        cmd: Command,
        done: Done,
        on_death: impl FnOnce(String),
        hold: bool,
    ) {
        let (kind, flags, offset, len, data) = encode(&cmd);
        // NBD lengths are 32-bit; callers split larger ranges, so this is a bug caught here
        // rather than a length sent truncated.
        let Ok(len) = u32::try_from(len) else {
            done(libc::EINVAL);
            return;
        };
        let cookie = {
            let mut t = lock(&self.table);
            if let Some(e) = t.dead {
                drop(t);
                done(e);
                return;
            }
            let index = match t.free.pop() {
                Some(i) => i,
                None => {
                    t.entries.push(None);
                    (t.entries.len() - 1) as u32
                }
            };
            t.generation = t.generation.wrapping_add(1);
            let cookie = (u64::from(t.generation) << 32) | u64::from(index);
            t.small += usize::from(small_reply(&cmd));
            t.entries[index as usize] = Some(Entry { cookie, cmd, done });
            cookie
        };
        let header = request(kind, flags, cookie, offset, len);
        let sent = if hold {
            let mut held = lock(&self.held);
            held.headers.push(header);
            held.data.push(data.unwrap_or((std::ptr::null(), 0)));
            if held.headers.len() < HOLD_MAX {
                return;
            }
            self.send_out(&mut held)
        } else {
            let (p, n) = data.unwrap_or((std::ptr::null(), 0));
            let mut iov = [
                libc::iovec {
                    iov_base: header.as_ptr() as *mut _,
                    iov_len: header.len(),
                },
                libc::iovec {
                    iov_base: p as *mut _,
                    iov_len: n,
                },
            ];
            self.send_all(&mut iov[..if n == 0 { 1 } else { 2 }])
        };
        if let Err(why) = sent {
            on_death(why);
            self.kill(libc::EIO);
        }
    }

    /// Sends the commands held back, in one message. On failure the caller cuts the
    /// connection (their `done` runs then, from the table). With `unless_busy`, returns at
    /// once if another thread is sending them: it may be waiting for room in a full socket,
    /// which only replies read meanwhile make.
    pub fn send_held(&self, unless_busy: bool) -> Result<(), String> {
        let mut held = if unless_busy {
            match self.held.try_lock() {
                Ok(h) => h,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => return Ok(()),
            }
        } else {
            lock(&self.held)
        };
        if held.headers.is_empty() {
            return Ok(());
        }
        self.send_out(&mut held)
    }

    fn send_out(&self, held: &mut Held) -> Result<(), String> {
        let Held { headers, data, iov } = held;
        iov.clear();
        for (h, &(p, n)) in headers.iter().zip(data.iter()) {
            iov.push(libc::iovec {
                iov_base: h.as_ptr() as *mut _,
                iov_len: h.len(),
            });
            if n > 0 {
                iov.push(libc::iovec {
                    iov_base: p as *mut _,
                    iov_len: n,
                });
            }
        }
        let r = self.send_all(iov);
        headers.clear();
        data.clear();
        r
    }

    /// Writes the pieces as one message, waiting (up to the timeout) while the socket is
    /// full. Senders take turns: a command's bytes are never interleaved.
    fn send_all(&self, iov: &mut [libc::iovec]) -> Result<(), String> {
        let _turn = lock(&self.send);
        let mut first = 0;
        while first < iov.len() {
            // SAFETY: a zeroed msghdr is valid; the iovecs point to the header and the
            // caller's buffer, live for this call.
            let n = unsafe {
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_iov = iov[first..].as_mut_ptr();
                msg.msg_iovlen = iov.len() - first;
                libc::sendmsg(self.fd, &msg, libc::MSG_NOSIGNAL)
            };
            if n < 0 {
                match errno() {
                    libc::EINTR => continue,
                    libc::EAGAIN => {
                        self.wait_writable()?;
                        continue;
                    }
                    e => {
                        return Err(format!(
                            "sending a command: {}",
                            std::io::Error::from_raw_os_error(e)
                        ))
                    }
                }
            }
            let mut n = n as usize;
            while first < iov.len() && n >= iov[first].iov_len {
                n -= iov[first].iov_len;
                first += 1;
            }
            if first < iov.len() {
                // SAFETY: n < iov_len: what is left of this piece.
                iov[first].iov_base = unsafe { (iov[first].iov_base as *mut u8).add(n) }.cast();
                iov[first].iov_len -= n;
            }
        }
        Ok(())
    }

    fn wait_writable(&self) -> Result<(), String> {
        let mut p = libc::pollfd {
            fd: self.fd,
            events: libc::POLLOUT,
            revents: 0,
        };
        let ms = self.timeout.as_millis().min(i32::MAX as u128) as c_int;
        loop {
            // SAFETY: one live pollfd.
            let r = unsafe { libc::poll(&mut p, 1, ms) };
            match r {
                0 => {
                    return Err(format!(
                        "the server took no data for {} s: connection cut",
                        self.timeout.as_secs_f64()
                    ))
                }
                r if r > 0 => return Ok(()),
                _ if errno() == libc::EINTR => continue,
                _ => return Err(format!("poll: {}", std::io::Error::last_os_error())),
            }
        }
    }

    /// Marks the connection dead and fails every command in flight with `errno` (those
    /// the reader holds it fails itself). The socket is shut down, so the reader wakes.
    pub fn kill(&self, errno: i32) {
        let entries = {
            let mut t = lock(&self.table);
            if t.dead.is_some() {
                return;
            }
            t.dead = Some(errno);
            t.free.clear();
            t.small = 0;
            std::mem::take(&mut t.entries)
        };
        // SAFETY: fd is the caller's socket, open while the Wire lives.
        unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
        // Held commands are in `entries` too: their buffers go back below, so their bytes
        // must never be sent.
        let mut held = lock(&self.held);
        held.headers.clear();
        held.data.clear();
        drop(held);
        for e in entries.into_iter().flatten() {
            (e.done)(errno);
        }
    }

    /// The command whose reply carries `cookie`, and whether every reply still due after it
    /// is a large read's.
    fn take(&self, cookie: u64) -> Option<(Entry, bool)> {
        let mut t = lock(&self.table);
        let index = (cookie & u64::from(u32::MAX)) as usize;
        let slot = t.entries.get_mut(index)?;
        if slot.as_ref().map(|e| e.cookie) != Some(cookie) {
            return None;
        }
        let e = slot.take()?;
        t.small -= usize::from(small_reply(&e.cmd));
        t.free.push(index as u32);
        Some((e, t.small == 0))
    }
}

/// The reader's side: replies parsed out of what the socket gave.
pub struct Reader {
    stage: Vec<u8>,
    start: usize,
    end: usize,
    /// The read whose data is arriving.
    current: Option<Arriving>,
    /// Bytes of read data copied out of the stage (the rest went straight to the reads'
    /// buffers).
    staged_data: u64,
    /// Every reply due is a large read's, as of the last reply parsed.
    only_large: bool,
}

/// A read whose reply header came and whose data is still arriving.
struct Arriving {
    entry: Entry,
    /// Where its next byte goes, and how many are still to come.
    next: *mut u8,
    rest: usize,
}

impl Arriving {
    /// Counts `n` more bytes as written at `next`.
    fn advance(&mut self, n: usize) {
        debug_assert!(n <= self.rest);
        // SAFETY: n <= rest: still within the read's buffer.
        self.next = unsafe { self.next.add(n) };
        self.rest -= n;
    }
}

/// Why the reader stopped reading.
pub enum Stop {
    /// Nothing more to read now.
    Drained,
    /// Read `READ_BUDGET` bytes; more may wait. A reader holds the connection's replies
    /// while it reads, and a server streaming large replies could keep it reading for as long
    /// as it sends: the host's ring thread, woken by the readable socket, would find the
    /// replies taken on every wake-up (and after a thousand such wake-ups give them up).
    Budget,
    /// The connection is finished: end of file, an error, or a protocol violation.
    Dead(String),
}

impl Default for Reader {
    fn default() -> Self {
        Reader {
            stage: vec![0; STAGE],
            start: 0,
            end: 0,
            current: None,
            staged_data: 0,
            only_large: false,
        }
    }
}

impl Reader {
    /// Reads what the socket holds and completes the commands whose replies are whole.
    pub fn read(&mut self, wire: &Wire) -> Stop {
        let mut taken = 0;
        loop {
            let (dest, want_dest) = self
                .current
                .as_ref()
                .map_or((std::ptr::null_mut(), 0), |a| (a.next, a.rest));
            // Only large replies due: room for the next header alone (see LARGE_REPLY).
            // `parse` left at most a partial header in the stage. As of the last reply
            // parsed: a small command sent since costs one short read.
            let room = if self.only_large {
                REPLY_LEN.saturating_sub(self.end).max(1)
            } else {
                STAGE - self.end
            };
            let mut iov = [
                libc::iovec {
                    iov_base: dest.cast(),
                    iov_len: want_dest,
                },
                libc::iovec {
                    // SAFETY: end <= STAGE.
                    iov_base: unsafe { self.stage.as_mut_ptr().add(self.end) }.cast(),
                    iov_len: room,
                },
            ];
            let skip = usize::from(want_dest == 0);
            let asked = want_dest + room;
            // SAFETY: a zeroed msghdr is valid; the iovecs point to the read's buffer (valid
            // until it completes) and our staging buffer.
            let n = unsafe {
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_iov = iov[skip..].as_mut_ptr();
                msg.msg_iovlen = 2 - skip;
                libc::recvmsg(wire.fd, &mut msg, libc::MSG_DONTWAIT)
            };
            if n == 0 {
                return Stop::Dead("the server closed the connection".into());
            }
            if n < 0 {
                return match errno() {
                    libc::EAGAIN => Stop::Drained,
                    libc::EINTR => continue,
                    e => Stop::Dead(format!(
                        "reading replies: {}",
                        std::io::Error::from_raw_os_error(e)
                    )),
                };
            }
            let got = n as usize;
            let direct = got.min(want_dest);
            if let Some(a) = &mut self.current {
                a.advance(direct);
            }
            self.end += got - direct;
            if let Err(why) = self.parse(wire) {
                return Stop::Dead(why);
            }
            if got < asked {
                // The socket gave less than there was room for: it is empty now.
                return Stop::Drained;
            }
            taken += got;
            if taken >= READ_BUDGET {
                return Stop::Budget;
            }
        }
    }

    fn parse(&mut self, wire: &Wire) -> Result<(), String> {
        loop {
            if let Some(a) = &mut self.current {
                let n = (self.end - self.start).min(a.rest);
                // SAFETY: the read's buffer has `rest` bytes left from `next`, valid until it
                // completes; n <= rest, and the staging range is initialized.
                unsafe {
                    std::ptr::copy_nonoverlapping(self.stage.as_ptr().add(self.start), a.next, n)
                };
                a.advance(n);
                self.start += n;
                self.staged_data += n as u64;
                if a.rest > 0 {
                    break;
                }
                if let Some(a) = self.current.take() {
                    (a.entry.done)(0);
                }
                continue;
            }
            if self.end - self.start < REPLY_LEN {
                break;
            }
            let header: &[u8; REPLY_LEN] = self.stage[self.start..self.start + REPLY_LEN]
                .try_into()
                .expect("16 bytes");
            let Some(reply) = parse_reply(header) else {
                return Err(format!(
                    "protocol error: a reply starts {:02x?}, not the simple reply magic (structured replies were not asked for)",
                    &header[..4]
                ));
            };
            self.start += REPLY_LEN;
            let Some((entry, only_large)) = wire.take(reply.cookie) else {
                return Err(format!(
                    "protocol error: a reply for cookie {:#x}, which no command in flight has",
                    reply.cookie
                ));
            };
            self.only_large = only_large;
            match (reply.error, entry.cmd) {
                (0, Command::Read { buf, len, .. }) => {
                    self.current = Some(Arriving {
                        entry,
                        next: buf,
                        rest: len,
                    })
                }
                (0, _) => (entry.done)(0),
                (e, _) => (entry.done)(nbd_errno(e)),
            }
        }
        // Keep the partial header at the front for the next read.
        self.stage.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        Ok(())
    }

    /// Fails the read whose data was arriving (the connection died under it).
    pub fn fail_current(&mut self, errno: i32) {
        if let Some(a) = self.current.take() {
            (a.entry.done)(errno);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_headers_are_big_endian_in_the_protocol_layout() {
        let h = request(CMD_WRITE, FLAG_FUA, 0x0102_0304_0506_0708, 0x1122, 4096);
        assert_eq!(&h[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&h[4..6], &[0, 1]);
        assert_eq!(&h[6..8], &[0, 1]);
        assert_eq!(&h[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&h[16..24], &[0, 0, 0, 0, 0, 0, 0x11, 0x22]);
        assert_eq!(&h[24..28], &[0, 0, 0x10, 0]);
    }

    #[test]
    fn replies_parse_and_a_bad_magic_is_refused() {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&5u32.to_be_bytes());
        b[8..16].copy_from_slice(&7u64.to_be_bytes());
        assert_eq!(
            parse_reply(&b),
            Some(Reply {
                error: 5,
                cookie: 7
            })
        );
        b[0] = 0x66;
        assert_eq!(parse_reply(&b), None);
    }

    /// A connected pair of non-blocking Unix sockets: (ours, the server's).
    fn pair() -> (c_int, c_int) {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two descriptors into a live array.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0);
        (fds[0], fds[1])
    }

    /// What the server side can read now (nothing: empty).
    fn drain(fd: c_int) -> Vec<u8> {
        let mut out = Vec::new();
        let mut b = [0u8; 65536];
        loop {
            // SAFETY: reads into a live buffer of its length.
            let n = unsafe { libc::read(fd, b.as_mut_ptr().cast(), b.len()) };
            if n <= 0 {
                return out;
            }
            out.extend_from_slice(&b[..n as usize]);
        }
    }

    fn write_cmd(data: &[u8], offset: u64) -> Command {
        Command::Write {
            buf: data.as_ptr(),
            len: data.len(),
            offset,
            fua: false,
        }
    }

    #[test]
    fn held_commands_go_out_together_in_order_and_never_after_a_kill() {
        let (ours, server) = pair();
        let wire = Wire::new(ours, Duration::from_secs(5));
        let data: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i + 1; 512]).collect();
        let failed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for (i, d) in data.iter().enumerate() {
            let f = failed.clone();
            let done: Done = Box::new(move |e| {
                if e != 0 {
                    f.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            });
            // SAFETY: `data` outlives the wire's use of it (sent below, or dropped by kill).
            unsafe { wire.submit(write_cmd(d, i as u64 * 512), done, |_| {}, true) };
        }
        assert!(drain(server).is_empty(), "held commands went out early");
        wire.send_held(false).unwrap();
        let got = drain(server);
        assert_eq!(got.len(), 3 * (REQUEST_LEN + 512));
        for (i, chunk) in got.chunks(REQUEST_LEN + 512).enumerate() {
            let offset = u64::from_be_bytes(chunk[16..24].try_into().unwrap());
            assert_eq!(offset, i as u64 * 512);
            assert!(chunk[REQUEST_LEN..].iter().all(|&b| b == i as u8 + 1));
        }
        // A full hold goes out without waiting for send_held.
        let one = vec![9u8; 16];
        for i in 0..HOLD_MAX {
            // SAFETY: `one` outlives the wire.
            unsafe { wire.submit(write_cmd(&one, i as u64), Box::new(|_| {}), |_| {}, true) };
        }
        assert_eq!(drain(server).len(), HOLD_MAX * (REQUEST_LEN + 16));
        // Killed with a command held: it fails, and its bytes are never sent.
        // SAFETY: as above.
        unsafe { wire.submit(write_cmd(&data[0], 0), Box::new(|_| {}), |_| {}, true) };
        let f = failed.clone();
        // SAFETY: as above.
        unsafe {
            wire.submit(
                write_cmd(&data[1], 512),
                Box::new(move |e| {
                    assert_eq!(e, libc::EIO);
                    f.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }),
                |_| {},
                true,
            )
        };
        wire.kill(libc::EIO);
        // The three sent first had no reply yet: they fail too.
        assert_eq!(failed.load(std::sync::atomic::Ordering::SeqCst), 4);
        wire.send_held(false).unwrap();
        assert!(
            drain(server).is_empty(),
            "a killed command's bytes were sent"
        );
        // SAFETY: our two descriptors, closed once.
        unsafe {
            libc::close(ours);
            libc::close(server);
        }
    }

    /// Writes all of `bytes` to the server's end, reading replies on `reader` whenever the
    /// socket is full.
    fn serve(server: c_int, bytes: &[u8], reader: &mut Reader, wire: &Wire) {
        let mut at = 0;
        while at < bytes.len() {
            // SAFETY: writes from a live buffer, within its length.
            let n = unsafe { libc::write(server, bytes[at..].as_ptr().cast(), bytes.len() - at) };
            if n > 0 {
                at += n as usize;
            } else {
                drained(reader, wire);
            }
        }
        drained(reader, wire);
    }

    /// Reads until the socket is empty.
    fn drained(reader: &mut Reader, wire: &Wire) {
        loop {
            match reader.read(wire) {
                Stop::Drained => return,
                Stop::Budget => continue,
                Stop::Dead(why) => panic!("{why}"),
            }
        }
    }

    fn reply(cookie: u64, data: &[u8]) -> Vec<u8> {
        let mut r = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        r.extend_from_slice(&0u32.to_be_bytes());
        r.extend_from_slice(&cookie.to_be_bytes());
        r.extend_from_slice(data);
        r
    }

    /// Only large reads in flight: once a reply has shown it (the reader learns what is due
    /// as it parses replies), each reply's header is read alone and its data goes straight
    /// to the read's buffer, none through the stage. With a small reply due as well, replies
    /// are read in bursts again. Every byte lands where it belongs either way.
    #[test]
    fn large_replies_go_straight_to_their_buffers_and_small_ones_come_in_bursts() {
        let (ours, server) = pair();
        let wire = Wire::new(ours, Duration::from_secs(5));
        let mut reader = Reader::default();
        let len = LARGE_REPLY * 3;
        let mut bufs: Vec<Vec<u8>> = (0..5).map(|_| vec![0u8; len]).collect();
        let patterns: Vec<Vec<u8>> = (0..5u8)
            .map(|k| (0..len).map(|i| (i as u8).wrapping_mul(7) ^ k).collect())
            .collect();
        let done = std::sync::Arc::new(Mutex::new(Vec::new()));
        let read = |buf: &mut Vec<u8>, offset: u64| Command::Read {
            buf: buf.as_mut_ptr(),
            len,
            offset,
        };
        let track = |tag: u32| -> Done {
            let done = done.clone();
            Box::new(move |e| lock(&done).push((tag, e)))
        };
        // The cookies of the commands sent, in order (a write's data skipped).
        let cookies = |server: c_int| -> Vec<u64> {
            let bytes = drain(server);
            let (mut out, mut at) = (Vec::new(), 0);
            while at < bytes.len() {
                let h = &bytes[at..at + REQUEST_LEN];
                out.push(u64::from_be_bytes(h[8..16].try_into().unwrap()));
                let kind = u16::from_be_bytes(h[6..8].try_into().unwrap());
                let data = u32::from_be_bytes(h[24..28].try_into().unwrap()) as usize;
                at += REQUEST_LEN + if kind == CMD_WRITE { data } else { 0 };
            }
            out
        };
        // Three large reads.
        for (i, b) in bufs[..3].iter_mut().enumerate() {
            // SAFETY: `bufs` outlives the wire's use of it: every read completes below.
            unsafe { wire.submit(read(b, i as u64), track(i as u32), |_| {}, false) };
        }
        assert_eq!(lock(&wire.table).small, 0);
        let c = cookies(server);
        serve(server, &reply(c[0], &patterns[0]), &mut reader, &wire);
        // The first reply came in a burst (nothing parsed yet); the next two did not.
        let first = reader.staged_data;
        let rest = [reply(c[1], &patterns[1]), reply(c[2], &patterns[2])].concat();
        serve(server, &rest, &mut reader, &wire);
        assert_eq!(
            reader.staged_data, first,
            "large replies went through the stage"
        );
        // Two more, with a write in flight between them: bursts again.
        let small = vec![5u8; 512];
        for (i, b) in bufs[3..].iter_mut().enumerate() {
            // SAFETY: as above.
            unsafe { wire.submit(read(b, 9 + i as u64), track(3 + i as u32), |_| {}, false) };
            if i == 0 {
                // SAFETY: `small` outlives the wire's use of it.
                unsafe { wire.submit(write_cmd(&small, 0), track(9), |_| {}, false) };
            }
        }
        assert_eq!(lock(&wire.table).small, 1);
        let c = cookies(server);
        let mixed = [
            reply(c[0], &patterns[3]),
            reply(c[1], &[]),
            reply(c[2], &patterns[4]),
        ]
        .concat();
        serve(server, &mixed, &mut reader, &wire);
        assert!(reader.staged_data > first, "a burst was expected");
        assert_eq!(lock(&wire.table).small, 0);
        let mut got = lock(&done).clone();
        got.sort();
        assert_eq!(got, vec![(0, 0), (1, 0), (2, 0), (3, 0), (4, 0), (9, 0)]);
        for (k, b) in bufs.iter().enumerate() {
            assert!(b == &patterns[k], "read {k} holds other bytes");
        }
        // SAFETY: our two descriptors, closed once.
        unsafe {
            libc::close(ours);
            libc::close(server);
        }
    }

    /// With more on the socket than one read may take, `read` gives the replies back after
    /// its budget, and the next calls finish the job.
    #[test]
    fn a_reader_gives_the_replies_back_after_its_budget() {
        let (ours, server) = pair();
        // Root may raise the server's send buffer past net.core.wmem_max: room for all the
        // replies at once, as a fast server keeps the socket full.
        let r = set_socket_int(server, libc::SO_SNDBUFFORCE, 8 << 20);
        assert_eq!(r, 0, "SO_SNDBUFFORCE (the tests run as root)");
        let wire = Wire::new(ours, Duration::from_secs(5));
        let mut reader = Reader::default();
        let len = 768 << 10;
        let mut bufs: Vec<Vec<u8>> = (0..4).map(|_| vec![0u8; len]).collect();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for (i, b) in bufs.iter_mut().enumerate() {
            let d = done.clone();
            let cmd = Command::Read {
                buf: b.as_mut_ptr(),
                len,
                offset: i as u64,
            };
            let cb: Done = Box::new(move |e| {
                assert_eq!(e, 0);
                d.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
            // SAFETY: `bufs` outlives the wire's use of it: every read completes below.
            unsafe { wire.submit(cmd, cb, |_| {}, false) };
        }
        let sent = drain(server);
        let mut replies = Vec::new();
        for (k, h) in sent.chunks(REQUEST_LEN).enumerate() {
            let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
            replies.extend(reply(cookie, &vec![k as u8 + 1; len]));
        }
        // SAFETY: writes from a live buffer of its length.
        let n = unsafe { libc::write(server, replies.as_ptr().cast(), replies.len()) };
        assert_eq!(
            n,
            replies.len() as isize,
            "the socket took every reply at once"
        );
        assert!(matches!(reader.read(&wire), Stop::Budget));
        let after_one = done.load(std::sync::atomic::Ordering::SeqCst);
        assert!(after_one < 4, "one read took everything");
        drained(&mut reader, &wire);
        assert_eq!(done.load(std::sync::atomic::Ordering::SeqCst), 4);
        for (k, b) in bufs.iter().enumerate() {
            assert!(b.iter().all(|&x| x == k as u8 + 1), "read {k}");
        }
        // SAFETY: our two descriptors, closed once.
        unsafe {
            libc::close(ours);
            libc::close(server);
        }
    }

    fn send_buffer(fd: c_int) -> c_int {
        let mut v: c_int = 0;
        let mut len = std::mem::size_of::<c_int>() as libc::socklen_t;
        // SAFETY: fd is a live socket; v and len are live and sized for the option.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&mut v as *mut c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0);
        v
    }

    fn sysctl(name: &str) -> c_int {
        std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// A Unix socket gets room for large writes (the kernel reports twice what it grants,
    /// capped at wmem_max), so a 1 MiB write is handed over without waiting for the server
    /// to read; a TCP socket keeps the kernel's autotuned size.
    #[test]
    fn a_unix_socket_takes_a_large_write_at_once_and_tcp_keeps_autotuning() {
        let (ours, server) = pair();
        let wire = Wire::new(ours, Duration::from_secs(5));
        let granted = UNIX_SEND_BUFFER.min(sysctl("wmem_max"));
        assert_eq!(send_buffer(ours), 2 * granted);
        if granted >= 2 << 20 {
            let data = vec![7u8; 1 << 20];
            let started = std::time::Instant::now();
            // SAFETY: `data` outlives the wire's use of it (sent here, in full).
            unsafe { wire.submit(write_cmd(&data, 0), Box::new(|_| {}), |_| {}, false) };
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "the write waited for the server"
            );
            assert_eq!(drain(server).len(), REQUEST_LEN + data.len());
        }
        // SAFETY: our two descriptors, closed once.
        unsafe {
            libc::close(ours);
            libc::close(server);
        }

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let _accepted = listener.accept().unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&client);
        let before = send_buffer(fd);
        let _wire = Wire::new(fd, Duration::from_secs(5));
        assert_eq!(send_buffer(fd), before);
    }

    #[test]
    fn nbd_errors_map_to_errno_and_unknown_ones_to_einval() {
        assert_eq!(nbd_errno(28), libc::ENOSPC);
        assert_eq!(nbd_errno(95), libc::EOPNOTSUPP);
        assert_eq!(nbd_errno(4242), libc::EINVAL);
    }
}
