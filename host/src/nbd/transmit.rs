//! Transmission: requests in, replies out.
//!
//! [`THREADS`] threads share a connection, each in turn reader and server (leader and
//! followers), so that a request costs no hand-off between threads (each costs a wake-up
//! and a context switch, more than serving a read from the page cache):
//!
//! - A thread that finds no request queued and nobody reading becomes the reader: one
//!   `recv` into a buffer of [`READ_BUFFER`] bytes brings every request the client has sent
//!   so far (a write's payload is read on to its end). It queues them and serves the first
//!   itself.
//! - A thread that takes a request while others are still queued wakes one sleeping
//!   thread, so requests that block in the plugin run side by side.
//! - If the thread that takes a request leaves nobody reading, the next ones could wait
//!   in the socket behind a request that blocks: one sleeping thread, the watcher, looks
//!   every [`TAKE_OVER`] while requests are being served and, finding nobody reading,
//!   reads; a request taken with nobody reading or watching wakes a thread at once.
//!
//! Each reply goes out whole, in one `writev` under the socket's lock, so replies to
//! different requests never interleave but may come in any order, as the protocol allows.
//! While requests are served fast, a thread takes a few small reads at once and answers
//! them in one `writev` (see [`COALESCE_MAX`]): one system call, and one wake-up of the
//! client, for them all.
//!
//! Nobody reads while requests are queued: what a connection holds queued is at most one
//! buffer of requests and one write payload (at most [`MAX_PAYLOAD`]), which holds a fast
//! client back.
//!
//! Checks, each answered with the protocol's error and the connection kept: a length of 0
//! or above [`MAX_PAYLOAD`] for reads and writes, a range past the end
//! of the export, a write or trim off the sector grid (`EINVAL`); a write to a read-only
//! export (`EPERM`); a command or flag not advertised (`EINVAL`). A wrong request magic
//! means the stream is lost: the client is disconnected. `NBD_CMD_DISC` waits for the
//! requests in flight to be answered, then closes.

use super::handshake::Session;
use super::meta;
use super::server::Stream;
use super::wire::*;
use super::{Export, MAX_PAYLOAD};
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use xen_disk_plugin_api::{with_read_bufs, with_write_bufs, Error, ErrorKind};

/// Threads per connection.
pub const THREADS: usize = 8;

/// How often the watcher looks for a reader while requests are being served: the longest
/// a request waits in the socket because the threads awake all block in the plugin.
pub const TAKE_OVER: Duration = Duration::from_micros(500);

/// Looks in a row that find the connection idle after which the watcher sleeps until a
/// request comes (10 ms).
pub const QUIET_ROUNDS: u32 = 20;

/// Queued work (requests times their average service time) per thread serving beyond
/// which a thread that takes a request wakes another: a wake-up costs a few microseconds,
/// worth it when it shortens the queue's wait by more than this.
pub const WAKE_FOR_NS: u64 = 50_000;

/// Requests taken together to be answered in one `writev`: at most this many, only
/// reads, at most [`COALESCE_BYTES`] of data, and only while requests are served in less
/// than [`COALESCE_BELOW_NS`] on average (a slow one would hold the others' replies back).
pub const COALESCE_MAX: usize = 8;
pub const COALESCE_BYTES: usize = 256 << 10;
pub const COALESCE_BELOW_NS: u64 = 20_000;

/// The request buffer: one `recv` takes up to this many bytes of requests.
pub const READ_BUFFER: usize = 64 * 1024;

/// One request and, for a write, its payload.
struct Job {
    req: Request,
    payload: Vec<u8>,
}

impl Job {
    /// The bytes a read's reply carries.
    fn data_len(&self) -> usize {
        if self.req.kind == CMD_READ {
            self.req.length as usize
        } else {
            0
        }
    }
}

/// The errno the protocol carries for a plugin error.
fn errno_of(e: &Error) -> u32 {
    match e.kind() {
        ErrorKind::OutOfRange => EINVAL,
        ErrorKind::ReadOnly => EPERM,
        ErrorKind::Unsupported => ENOTSUP,
        _ => match e.errno() {
            28 => ENOSPC,
            12 => ENOMEM,
            1 | 13 | 30 => EPERM,
            _ => EIO,
        },
    }
}

/// Writes every piece, in order, with as few system calls as the socket takes.
fn write_all_vectored(w: &mut Stream, pieces: &mut [io::IoSlice<'_>]) -> io::Result<()> {
    let mut rest = pieces;
    while !rest.is_empty() {
        // The kernel takes at most IOV_MAX pieces at once.
        let n = rest.len().min(1024);
        match w.write_vectored(&rest[..n]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The request side of the connection: the socket behind a buffer.
struct Reader {
    conn: Stream,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Reader {
    /// Waits for at least one request, then queues every request buffered. `Ok(false)` at
    /// the end of the stream or at `NBD_CMD_DISC` (the requests before it are queued).
    fn read_batch(&mut self, jobs: &mut VecDeque<Job>, c: &Conn<'_>) -> Result<bool, String> {
        while self.end - self.start < REQUEST_LEN {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            match self.conn.read(&mut self.buf[self.end..]) {
                Ok(0) if self.end == 0 => return Ok(false),
                Ok(0) => return Err("reading a request: the stream ended inside one".into()),
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("reading a request: {e}")),
            }
        }
        while self.end - self.start >= REQUEST_LEN {
            let mut head = [0u8; REQUEST_LEN];
            head.copy_from_slice(&self.buf[self.start..self.start + REQUEST_LEN]);
            self.start += REQUEST_LEN;
            let Some(req) = Request::parse(&head) else {
                return Err("a request with a wrong magic (the stream is lost)".into());
            };
            match req.kind {
                CMD_DISC => return Ok(false),
                CMD_WRITE if req.length > MAX_PAYLOAD => {
                    // Read and drop the payload so the stream stays in step, then refuse.
                    self.skip(u64::from(req.length))
                        .map_err(|e| format!("reading a write's payload: {e}"))?;
                    let reply = error_reply(
                        c.session,
                        &req,
                        EINVAL,
                        "write larger than the maximum payload",
                    );
                    c.send(&mut [io::IoSlice::new(&reply)]);
                }
                CMD_WRITE => {
                    let mut payload = vec![0u8; req.length as usize];
                    self.fill(&mut payload)
                        .map_err(|e| format!("reading a write's payload: {e}"))?;
                    jobs.push_back(Job { req, payload });
                }
                _ => jobs.push_back(Job {
                    req,
                    payload: Vec::new(),
                }),
            }
        }
        Ok(true)
    }

    /// Fills `out` from the buffer, then from the socket.
    fn fill(&mut self, out: &mut [u8]) -> io::Result<()> {
        let n = out.len().min(self.end - self.start);
        out[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
        self.start += n;
        self.conn.read_exact(&mut out[n..])
    }

    /// Reads and drops `n` bytes.
    fn skip(&mut self, mut n: u64) -> io::Result<()> {
        let k = n.min((self.end - self.start) as u64) as usize;
        self.start += k;
        n -= k as u64;
        let mut sink = vec![0u8; 64 * 1024];
        while n > 0 {
            let k = n.min(sink.len() as u64) as usize;
            self.conn.read_exact(&mut sink[..k])?;
            n -= k as u64;
        }
        Ok(())
    }
}

/// The sleeper that watches the requests being served (see [`TAKE_OVER`]).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
enum Watcher {
    /// Nobody watches: the next thread to go to sleep will.
    #[default]
    None,
    /// Asleep for [`TAKE_OVER`], requests being served.
    Timed,
    /// Asleep until woken: nothing was being served when it went to sleep.
    Idle,
    /// Woken, not yet running.
    Waking,
}

/// What the threads of a connection share, under one lock.
struct State {
    queue: VecDeque<Job>,
    /// A thread is reading requests.
    reading: bool,
    /// No more requests will come: the threads finish the queue and leave.
    ended: bool,
    /// Requests being served.
    serving: usize,
    /// How long serving a request takes, on average over the last few (nanoseconds).
    service_ns: u64,
    /// Threads asleep (besides the watcher), and how many of them were woken and have
    /// not run yet.
    sleeping: usize,
    woken: usize,
    watcher: Watcher,
    /// Requests taken so far, and the watcher's looks in a row that found none taken and
    /// none being served.
    taken: u64,
    quiet: u32,
    /// Why the connection ended, if the client broke it.
    broken: Option<String>,
}

impl Default for State {
    fn default() -> Self {
        State {
            queue: VecDeque::new(),
            reading: false,
            ended: false,
            serving: 0,
            // Until measured, requests are taken to be slow: served side by side.
            service_ns: 1_000_000,
            sleeping: 0,
            woken: 0,
            watcher: Watcher::None,
            taken: 0,
            quiet: 0,
            broken: None,
        }
    }
}

/// One connection.
struct Conn<'a> {
    export: &'a Export,
    session: &'a Session,
    state: Mutex<State>,
    /// Sleepers wait here for requests.
    more: Condvar,
    /// The watcher waits here.
    watch: Condvar,
    reader: Mutex<Reader>,
    writer: Mutex<Stream>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Conn<'_> {
    /// One thread's life: serve queued requests, read more when nobody does, else sleep.
    fn work(&self) {
        // The thread's read buffer, reused: no allocation and no zeroing per request once
        // it has grown.
        let mut data = Vec::new();
        let mut batch = VecDeque::new();
        // The requests taken together and their replies, reused.
        let mut mine = Vec::new();
        let mut replies = Vec::new();
        let mut st = lock(&self.state);
        loop {
            if let Some(job) = st.queue.pop_front() {
                // Small reads served fast: take a few more and answer them in one writev,
                // one system call and one wake-up of the client for them all.
                let mut bytes = job.data_len();
                mine.push(job);
                while st.service_ns < COALESCE_BELOW_NS && mine.len() < COALESCE_MAX {
                    match st.queue.front() {
                        Some(j)
                            if j.req.kind == CMD_READ && bytes + j.data_len() <= COALESCE_BYTES =>
                        {
                            bytes += j.data_len();
                            mine.extend(st.queue.pop_front());
                        }
                        _ => break,
                    }
                }
                st.serving += mine.len();
                st.taken += mine.len() as u64;
                // More requests queued than the threads serving would get through in
                // WAKE_FOR: one more thread to serve them side by side. Nobody reading and
                // nobody watching: one more thread to read, in case this request blocks and
                // the client sends others.
                let backlog = st.queue.len() as u64 * st.service_ns;
                let wake = backlog > WAKE_FOR_NS.saturating_mul(st.serving as u64)
                    || (st.watcher == Watcher::None && !st.reading);
                if wake && st.sleeping > st.woken {
                    st.woken += 1;
                    self.more.notify_one();
                }
                if st.watcher == Watcher::Idle {
                    st.watcher = Watcher::Waking;
                    self.watch.notify_one();
                }
                drop(st);
                let started = Instant::now();
                let mut at = 0;
                for job in &mine {
                    let reply = serve(self.export, self.session, job, &mut data, at);
                    let len = if reply.with_data {
                        job.req.length as usize
                    } else {
                        0
                    };
                    replies.push((reply, at, len));
                    at += len;
                }
                let mut pieces = Vec::with_capacity(2 * replies.len());
                for (reply, at, len) in &replies {
                    pieces.push(io::IoSlice::new(reply.bytes()));
                    if *len > 0 {
                        pieces.push(io::IoSlice::new(&data[*at..at + len]));
                    }
                }
                self.send(&mut pieces);
                let n = mine.len() as u64;
                mine.clear();
                replies.clear();
                let took = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX) / n;
                st = lock(&self.state);
                st.serving -= n as usize;
                st.service_ns = st.service_ns - st.service_ns / 8 + took / 8;
            } else if st.ended {
                return;
            } else if !st.reading {
                st.reading = true;
                drop(st);
                let read = lock(&self.reader).read_batch(&mut batch, self);
                st = lock(&self.state);
                st.reading = false;
                st.queue.append(&mut batch);
                let end = match read {
                    Ok(more) => !more,
                    Err(why) => {
                        st.broken = Some(why);
                        true
                    }
                };
                if end {
                    st.ended = true;
                    self.more.notify_all();
                    self.watch.notify_all();
                }
            } else if st.watcher == Watcher::None {
                // Someone is reading. If the reader takes a request that blocks in the
                // plugin, nobody reads the next ones: while requests are served the watcher
                // looks every TAKE_OVER and, finding nobody reading, reads.
                // It stops looking once nothing was taken for QUIET_ROUNDS looks (an idle
                // connection costs no wake-ups) and is woken by the next request taken.
                let timed = st.serving > 0 || st.quiet < QUIET_ROUNDS;
                let taken = st.taken;
                st.watcher = if timed { Watcher::Timed } else { Watcher::Idle };
                st = if timed {
                    match self.watch.wait_timeout(st, TAKE_OVER) {
                        Ok((g, _)) => g,
                        Err(p) => p.into_inner().0,
                    }
                } else {
                    self.watch.wait(st).unwrap_or_else(|p| p.into_inner())
                };
                st.watcher = Watcher::None;
                if st.taken == taken && st.serving == 0 {
                    st.quiet = st.quiet.saturating_add(1);
                } else {
                    st.quiet = 0;
                }
            } else {
                st.sleeping += 1;
                st = self.more.wait(st).unwrap_or_else(|p| p.into_inner());
                st.sleeping -= 1;
                st.woken = st.woken.saturating_sub(1);
            }
        }
    }

    /// Sends replies whole, in order.
    fn send(&self, pieces: &mut [io::IoSlice<'_>]) {
        let mut w = lock(&self.writer);
        if write_all_vectored(&mut w, pieces).is_err() {
            // The client is gone: stop the reader too.
            w.shutdown();
        }
    }
}

/// Serves requests on `conn` until the client disconnects or breaks the protocol (the
/// error says how).
pub fn run(conn: Stream, export: &Export, session: Session) -> Result<(), String> {
    let writer = Mutex::new(conn.try_clone().map_err(|e| e.to_string())?);
    let closer = conn.try_clone().map_err(|e| e.to_string())?;
    let c = Conn {
        export,
        session: &session,
        state: Mutex::new(State::default()),
        more: Condvar::new(),
        watch: Condvar::new(),
        reader: Mutex::new(Reader {
            conn,
            buf: vec![0u8; READ_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
        }),
        writer,
    };
    std::thread::scope(|scope| {
        for _ in 1..THREADS {
            // A thread that cannot start leaves the others to serve.
            let _ = std::thread::Builder::new()
                .name("nbd-conn".into())
                .spawn_scoped(scope, || c.work());
        }
        c.work();
    });
    closer.shutdown();
    let broken = lock(&c.state).broken.take();
    broken.map_or(Ok(()), Err)
}

/// A reply: bytes, followed for a read that succeeded by the data in the thread's buffer.
struct Reply {
    head: [u8; 28],
    len: usize,
    built: Vec<u8>,
    with_data: bool,
}

impl Reply {
    fn head(bytes: &[u8], with_data: bool) -> Reply {
        let mut head = [0u8; 28];
        head[..bytes.len()].copy_from_slice(bytes);
        Reply {
            head,
            len: bytes.len(),
            built: Vec::new(),
            with_data,
        }
    }
    fn built(built: Vec<u8>) -> Reply {
        Reply {
            head: [0u8; 28],
            len: 0,
            built,
            with_data: false,
        }
    }
    fn bytes(&self) -> &[u8] {
        if self.len > 0 {
            &self.head[..self.len]
        } else {
            &self.built
        }
    }
}

/// The reply to a failed request: an error chunk for reads and block status under
/// structured replies, a simple reply otherwise.
fn error_reply(session: &Session, req: &Request, errno: u32, message: &str) -> Vec<u8> {
    if session.structured && matches!(req.kind, CMD_READ | CMD_BLOCK_STATUS) {
        error_chunk(req.cookie, errno, message)
    } else {
        simple_reply(req.cookie, errno).to_vec()
    }
}

fn ok_reply(session: &Session, req: &Request) -> Reply {
    if session.structured {
        Reply::head(
            &chunk_header(req.cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0),
            false,
        )
    } else {
        Reply::head(&simple_reply(req.cookie, 0), false)
    }
}

/// Serves one request. For a read that succeeds, the data is left in `data`.
fn serve(export: &Export, session: &Session, job: &Job, data: &mut Vec<u8>, at: usize) -> Reply {
    let req = &job.req;
    match check(export, session, req) {
        Err((errno, why)) => Reply::built(error_reply(session, req, errno, why)),
        Ok(()) => match run_command(export, session, job, data, at) {
            Ok(reply) => reply,
            Err(e) => {
                tracing::debug!(
                    "nbd: request {} at {}+{}: {e}",
                    req.kind,
                    req.offset,
                    req.length
                );
                Reply::built(error_reply(session, req, errno_of(&e), &e.to_string()))
            }
        },
    }
}

/// The protocol-level checks before the disk is asked.
fn check(export: &Export, session: &Session, req: &Request) -> Result<(), (u32, &'static str)> {
    let flags = export.transmission_flags();
    let size = export.disk.size();
    let ls = u64::from(export.disk.info().logical_sector_size);
    let allowed = match req.kind {
        CMD_READ | CMD_FLUSH => 0,
        CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        _ => return Err((EINVAL, "unknown command")),
    };
    if req.flags & !allowed != 0 {
        return Err((EINVAL, "a flag this command does not take"));
    }
    let writes = matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && flags & TF_READ_ONLY != 0 {
        return Err((EPERM, "the export is read-only"));
    }
    if req.kind == CMD_TRIM && flags & TF_SEND_TRIM == 0 {
        return Err((EINVAL, "trim is not offered"));
    }
    if req.kind == CMD_BLOCK_STATUS && (!session.structured || session.contexts.is_empty()) {
        return Err((EINVAL, "no metadata context was selected"));
    }
    if req.kind == CMD_FLUSH {
        return Ok(());
    }
    let len = u64::from(req.length);
    if len == 0 {
        return Err((EINVAL, "zero length"));
    }
    if matches!(req.kind, CMD_READ | CMD_WRITE) && req.length > MAX_PAYLOAD {
        return Err((EINVAL, "larger than the maximum payload"));
    }
    if req.offset.checked_add(len).is_none_or(|end| end > size) {
        return Err((EINVAL, "past the end of the export"));
    }
    if req.kind != CMD_READ && (!req.offset.is_multiple_of(ls) || !len.is_multiple_of(ls)) {
        return Err((EINVAL, "not aligned to the minimum block size"));
    }
    Ok(())
}

fn run_command(
    export: &Export,
    session: &Session,
    job: &Job,
    data: &mut Vec<u8>,
    at: usize,
) -> Result<Reply, Error> {
    let req = &job.req;
    let disk = &export.disk;
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let len = u64::from(req.length);
    match req.kind {
        CMD_READ => {
            read(export, req.offset, len, data, at)?;
            if session.structured {
                let mut h = [0u8; 28];
                h[..20].copy_from_slice(&chunk_header(
                    req.cookie,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_DATA,
                    8 + req.length,
                ));
                h[20..].copy_from_slice(&req.offset.to_be_bytes());
                Ok(Reply::head(&h, true))
            } else {
                Ok(Reply::head(&simple_reply(req.cookie, 0), true))
            }
        }
        CMD_WRITE => {
            with_write_bufs(&[&job.payload], |b| disk.write(req.offset, b, fua))?;
            Ok(ok_reply(session, req))
        }
        CMD_FLUSH => {
            disk.flush()?;
            Ok(ok_reply(session, req))
        }
        CMD_TRIM => {
            disk.discard(req.offset, len)?;
            if fua {
                disk.flush()?;
            }
            Ok(ok_reply(session, req))
        }
        CMD_WRITE_ZEROES => {
            disk.write_zeroes(req.offset, len)?;
            if fua {
                disk.flush()?;
            }
            Ok(ok_reply(session, req))
        }
        CMD_BLOCK_STATUS => Ok(Reply::built(block_status(export, session, req))),
        _ => Err(Error::unsupported("command")),
    }
}

/// Reads `len` bytes at `offset` into `buf` from `at` on; an unaligned range is read
/// through a bounce buffer covering whole sectors (the bytes after the range in `buf` are
/// scratch).
fn read(export: &Export, offset: u64, len: u64, buf: &mut Vec<u8>, at: usize) -> Result<(), Error> {
    let ls = u64::from(export.disk.info().logical_sector_size);
    let start = offset / ls * ls;
    let end = (offset + len).div_ceil(ls) * ls;
    let n = (end - start) as usize;
    if buf.len() < at + n {
        buf.resize(at + n, 0);
    }
    with_read_bufs(&mut [&mut buf[at..at + n]], |b| export.disk.read(start, b))?;
    if start != offset {
        let skip = at + (offset - start) as usize;
        buf.copy_within(skip..skip + len as usize, at);
    }
    Ok(())
}

/// One block status chunk per selected context, the last marked done.
fn block_status(export: &Export, session: &Session, req: &Request) -> Vec<u8> {
    let align = u64::from(export.disk.info().logical_sector_size);
    let mut out = Vec::new();
    let n = session.contexts.len();
    for (i, &context) in session.contexts.iter().enumerate() {
        let mut d = meta::status(export, context, req.offset, u64::from(req.length), align);
        if req.flags & CMD_FLAG_REQ_ONE != 0 {
            d.truncate(1);
        }
        let flags = if i + 1 == n { REPLY_FLAG_DONE } else { 0 };
        out.extend_from_slice(&chunk_header(
            req.cookie,
            flags,
            REPLY_TYPE_BLOCK_STATUS,
            4 + 8 * d.len() as u32,
        ));
        out.extend_from_slice(&(i as u32 + 1).to_be_bytes());
        for (l, f) in d {
            out.extend_from_slice(&l.to_be_bytes());
            out.extend_from_slice(&f.to_be_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::GuardedDisk;
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;
    use xen_disk_plugin_api::{Disk, DiskInfo, ReadBufs, WriteBufs};

    /// How long a test waits for something that should happen at once (a hang guard).
    const PATIENCE: Duration = Duration::from_secs(30);

    /// Reads that wait in the plugin in groups: the reads numbered 1 to `want` wait until
    /// the `want`th has come, the next `want` until the `2 want`th, and so on.
    #[derive(Default)]
    struct Gate {
        /// Reads that came so far.
        came: Mutex<usize>,
        changed: Condvar,
        want: usize,
    }

    impl Gate {
        /// Waits until `n` reads have come; false if they never do.
        fn wait_for(&self, n: usize) -> bool {
            let deadline = Instant::now() + PATIENCE;
            let mut came = lock(&self.came);
            while *came < n {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return false;
                }
                came = self.changed.wait_timeout(came, left).unwrap().0;
            }
            true
        }
    }

    struct GateDisk(Arc<Gate>);

    impl Disk for GateDisk {
        fn info(&self) -> DiskInfo {
            DiskInfo::new(1 << 20)
        }
        fn read(&self, _: u64, _: &mut ReadBufs<'_>) -> xen_disk_plugin_api::Result<()> {
            let me = {
                let mut came = lock(&self.0.came);
                *came += 1;
                *came
            };
            self.0.changed.notify_all();
            if self.0.wait_for(me.div_ceil(self.0.want) * self.0.want) {
                Ok(())
            } else {
                Err(Error::new(ErrorKind::Other, "the other reads never came"))
            }
        }
        fn write(&self, _: u64, _: &WriteBufs<'_>) -> xen_disk_plugin_api::Result<()> {
            Ok(())
        }
    }

    /// A connection to a read-only export of a [`GateDisk`] that needs `want` reads at once.
    fn connect(
        want: usize,
    ) -> (
        UnixStream,
        Arc<Gate>,
        std::thread::JoinHandle<Result<(), String>>,
    ) {
        let gate = Arc::new(Gate {
            want,
            ..Gate::default()
        });
        let disk = GuardedDisk::new(Box::new(GateDisk(gate.clone())), true).unwrap();
        let export = Export {
            name: String::new(),
            description: String::new(),
            disk: Arc::new(disk),
            bitmaps: Vec::new(),
        };
        let (client, server) = UnixStream::pair().unwrap();
        client.set_read_timeout(Some(PATIENCE)).unwrap();
        let session = Session {
            structured: false,
            contexts: Vec::new(),
        };
        let served = std::thread::spawn(move || run(Stream::Unix(server), &export, session));
        (client, gate, served)
    }

    fn request(kind: u16, cookie: u64) -> Vec<u8> {
        let mut v = REQUEST_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&0u16.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&(cookie * 4096).to_be_bytes());
        v.extend_from_slice(&4096u32.to_be_bytes());
        v
    }

    /// Reads `n` simple read replies; returns their (error, cookie), sorted.
    fn replies(c: &mut UnixStream, n: usize) -> Vec<(u32, u64)> {
        let mut got: Vec<(u32, u64)> = (0..n)
            .map(|_| {
                let mut h = [0u8; 16];
                c.read_exact(&mut h).unwrap();
                assert_eq!(be32(&h[0..4]), SIMPLE_REPLY_MAGIC);
                let (error, cookie) = (be32(&h[4..8]), be64(&h[8..16]));
                if error == 0 {
                    c.read_exact(&mut [0u8; 4096]).unwrap();
                }
                (error, cookie)
            })
            .collect();
        got.sort();
        got
    }

    #[test]
    fn requests_sent_together_that_block_are_served_side_by_side() {
        let (mut c, _gate, served) = connect(4);
        let all: Vec<u8> = (0..4).flat_map(|i| request(CMD_READ, i)).collect();
        c.write_all(&all).unwrap();
        assert_eq!(
            replies(&mut c, 4),
            (0..4).map(|i| (0, i)).collect::<Vec<_>>()
        );
        c.write_all(&request(CMD_DISC, 9)).unwrap();
        assert_eq!(served.join().unwrap(), Ok(()));
    }

    #[test]
    fn requests_sent_one_by_one_while_the_others_block_are_read_and_served() {
        // First every thread serves one of THREADS requests sent together, then goes back
        // to sleep; then each request is sent only once the one before is inside the
        // plugin, blocked: the thread serving it cannot read the next, so another must, up
        // to the last thread.
        let (mut c, gate, served) = connect(THREADS);
        let n = THREADS as u64;
        let all: Vec<u8> = (0..n).flat_map(|i| request(CMD_READ, i)).collect();
        c.write_all(&all).unwrap();
        assert_eq!(
            replies(&mut c, THREADS),
            (0..n).map(|i| (0, i)).collect::<Vec<_>>()
        );
        for i in n..2 * n {
            c.write_all(&request(CMD_READ, i)).unwrap();
            assert!(gate.wait_for(i as usize + 1), "request {i} was never read");
        }
        assert_eq!(
            replies(&mut c, THREADS),
            (n..2 * n).map(|i| (0, i)).collect::<Vec<_>>()
        );
        drop(c);
        assert_eq!(served.join().unwrap(), Ok(()));
    }

    /// A disk whose every byte is a function of its offset (kept in memory: reads are
    /// fast enough to be answered together).
    struct Pattern(Vec<u8>);

    fn byte_at(offset: u64) -> u8 {
        (offset ^ (offset >> 9)) as u8
    }

    impl Disk for Pattern {
        fn info(&self) -> DiskInfo {
            DiskInfo::new(1 << 20)
        }
        fn read(&self, offset: u64, b: &mut ReadBufs<'_>) -> xen_disk_plugin_api::Result<()> {
            let at = offset as usize;
            b.copy_from(&self.0[at..at + b.len()]);
            Ok(())
        }
        fn write(&self, _: u64, _: &WriteBufs<'_>) -> xen_disk_plugin_api::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn many_small_reads_sent_together_each_get_their_own_bytes() {
        // Fast reads sent together are answered several to a writev once the service time
        // is measured: each reply must still carry its own range, unaligned ones too.
        let bytes = (0..1 << 20).map(byte_at).collect();
        let disk = GuardedDisk::new(Box::new(Pattern(bytes)), true).unwrap();
        let export = Export {
            name: String::new(),
            description: String::new(),
            disk: Arc::new(disk),
            bitmaps: Vec::new(),
        };
        let (mut c, server) = UnixStream::pair().unwrap();
        c.set_read_timeout(Some(PATIENCE)).unwrap();
        let session = Session {
            structured: true,
            contexts: Vec::new(),
        };
        let served = std::thread::spawn(move || run(Stream::Unix(server), &export, session));
        let ranges: Vec<(u64, u32)> = (0..400u64)
            .map(|i| {
                (
                    (i * 7919) % 1000 * 1000 + i % 3,
                    1 + (i as u32 * 613) % 9000,
                )
            })
            .collect();
        let mut all = Vec::new();
        for (i, &(offset, len)) in ranges.iter().enumerate() {
            all.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            all.extend_from_slice(&0u16.to_be_bytes());
            all.extend_from_slice(&CMD_READ.to_be_bytes());
            all.extend_from_slice(&(i as u64).to_be_bytes());
            all.extend_from_slice(&offset.to_be_bytes());
            all.extend_from_slice(&len.to_be_bytes());
        }
        c.write_all(&all).unwrap();
        let mut seen = vec![false; ranges.len()];
        for _ in 0..ranges.len() {
            let mut h = [0u8; 28];
            c.read_exact(&mut h).unwrap();
            assert_eq!(be32(&h[0..4]), STRUCTURED_REPLY_MAGIC);
            assert_eq!(be16(&h[6..8]), REPLY_TYPE_OFFSET_DATA);
            let cookie = be64(&h[8..16]) as usize;
            let (offset, len) = ranges[cookie];
            assert_eq!(be32(&h[16..20]), 8 + len);
            assert_eq!(be64(&h[20..28]), offset);
            let mut data = vec![0u8; len as usize];
            c.read_exact(&mut data).unwrap();
            let want: Vec<u8> = (offset..offset + u64::from(len)).map(byte_at).collect();
            assert!(data == want, "request {cookie}: {offset}+{len}");
            assert!(
                !std::mem::replace(&mut seen[cookie], true),
                "two replies to {cookie}"
            );
        }
        drop(c);
        assert_eq!(served.join().unwrap(), Ok(()));
    }

    #[test]
    fn a_wrong_magic_after_good_requests_answers_them_then_disconnects() {
        let (mut c, _gate, served) = connect(1);
        let mut bytes: Vec<u8> = (0..3).flat_map(|i| request(CMD_READ, i)).collect();
        bytes.extend_from_slice(&[0xff; REQUEST_LEN]);
        c.write_all(&bytes).unwrap();
        assert_eq!(
            replies(&mut c, 3),
            (0..3).map(|i| (0, i)).collect::<Vec<_>>()
        );
        assert!(matches!(c.read(&mut [0u8; 1]), Ok(0) | Err(_)));
        assert!(served.join().unwrap().unwrap_err().contains("wrong magic"));
    }
}
