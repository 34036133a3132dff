//! Transmission: requests in, replies out.
//!
//! The connection's thread reads requests (and write payloads) and queues them; a few
//! workers serve them through the [`GuardedDisk`](crate::plugin::GuardedDisk) and send each
//! reply whole under the socket's lock, so replies to different requests never interleave
//! but may come in any order, as the protocol allows. The bytes queued (write payloads and
//! read buffers) are bounded by [`QUEUED_BYTES`]: the reader stops reading while they are
//! taken, which holds a fast client back.
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
use std::io::{self, Read, Write};
use std::sync::mpsc;
use std::sync::{Condvar, Mutex};
use xen_disk_plugin_api::{with_read_bufs, with_write_bufs, Error, ErrorKind};

/// Workers per connection.
pub const WORKERS: usize = 8;

/// Payload and buffer bytes a connection may have queued at once (one request of any
/// size is always let through when nothing is queued).
pub const QUEUED_BYTES: u64 = 128 << 20;

/// One request and, for a write, its payload.
struct Job {
    req: Request,
    payload: Vec<u8>,
    /// Bytes taken from the budget, given back once answered.
    cost: u64,
}

/// A byte budget the reader waits on.
struct Budget {
    used: Mutex<u64>,
    freed: Condvar,
}

impl Budget {
    fn take(&self, n: u64) {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        while *used > 0 && *used + n > QUEUED_BYTES {
            used = self.freed.wait(used).unwrap_or_else(|p| p.into_inner());
        }
        *used += n;
    }
    fn give(&self, n: u64) {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        *used -= n;
        self.freed.notify_all();
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

/// True when `head` is an error reply (simple with a non-zero error, or an error chunk).
fn is_error(head: &[u8]) -> bool {
    match be32(&head[0..4]) {
        SIMPLE_REPLY_MAGIC => be32(&head[4..8]) != 0,
        _ => be16(&head[6..8]) & (1 << 15) != 0,
    }
}

/// Writes every piece, in order, with as few system calls as the socket takes.
fn write_all_vectored(w: &mut Stream, pieces: &mut [&[u8]]) -> io::Result<()> {
    let mut slices: Vec<io::IoSlice<'_>> = pieces.iter().map(|p| io::IoSlice::new(p)).collect();
    let mut rest = &mut slices[..];
    io::IoSlice::advance_slices(&mut rest, 0);
    while !rest.is_empty() {
        match w.write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` on a clean end of stream before the first.
fn read_whole(s: &mut Stream, buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Serves requests on `conn` until the client disconnects or breaks the protocol (the
/// error says how).
pub fn run(mut conn: Stream, export: &Export, session: Session) -> Result<(), String> {
    let writer = Mutex::new(conn.try_clone().map_err(|e| e.to_string())?);
    let budget = Budget {
        used: Mutex::new(0),
        freed: Condvar::new(),
    };
    let (tx, rx) = mpsc::channel::<Job>();
    let rx = Mutex::new(rx);
    let out = std::thread::scope(|scope| {
        for _ in 0..WORKERS {
            scope.spawn(|| {
                // Each worker reads into its own buffer, reused: no allocation and no
                // zeroing per request once it has grown.
                let mut data = Vec::new();
                loop {
                    let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                        Ok(j) => j,
                        Err(_) => return,
                    };
                    let reply = serve(export, &session, &job, &mut data);
                    let mut pieces: Vec<&[u8]> = reply.iter().map(Vec::as_slice).collect();
                    if job.req.kind == CMD_READ && reply.len() == 1 && !is_error(&reply[0]) {
                        pieces.push(&data[..job.req.length as usize]);
                    }
                    let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
                    if write_all_vectored(&mut w, &mut pieces).is_err() {
                        // The client is gone: stop the reader too.
                        w.shutdown();
                    }
                    drop(w);
                    budget.give(job.cost);
                }
            });
        }
        let result = read_requests(&mut conn, &tx, &budget, &writer, &session);
        drop(tx);
        result
    });
    conn.shutdown();
    out
}

fn read_requests(
    conn: &mut Stream,
    tx: &mpsc::Sender<Job>,
    budget: &Budget,
    writer: &Mutex<Stream>,
    session: &Session,
) -> Result<(), String> {
    let mut head = [0u8; REQUEST_LEN];
    loop {
        match read_whole(conn, &mut head) {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(e) => return Err(format!("reading a request: {e}")),
        }
        let Some(req) = Request::parse(&head) else {
            return Err("a request with a wrong magic (the stream is lost)".into());
        };
        match req.kind {
            CMD_DISC => return Ok(()),
            CMD_WRITE if req.length > MAX_PAYLOAD => {
                // Read and drop the payload so the stream stays in step, then refuse.
                let mut left = u64::from(req.length);
                let mut sink = vec![0u8; 64 * 1024];
                while left > 0 {
                    let n = left.min(sink.len() as u64) as usize;
                    conn.read_exact(&mut sink[..n])
                        .map_err(|e| format!("reading a write's payload: {e}"))?;
                    left -= n as u64;
                }
                let reply = error_reply(
                    session,
                    &req,
                    EINVAL,
                    "write larger than the maximum payload",
                );
                let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
                for b in reply {
                    w.write_all(&b).map_err(|e| e.to_string())?;
                }
            }
            CMD_WRITE => {
                let cost = u64::from(req.length);
                budget.take(cost);
                let mut payload = vec![0u8; req.length as usize];
                conn.read_exact(&mut payload)
                    .map_err(|e| format!("reading a write's payload: {e}"))?;
                let _ = tx.send(Job { req, payload, cost });
            }
            _ => {
                let cost = if req.kind == CMD_READ {
                    u64::from(req.length.min(MAX_PAYLOAD))
                } else {
                    0
                };
                budget.take(cost);
                let _ = tx.send(Job {
                    req,
                    payload: Vec::new(),
                    cost,
                });
            }
        }
    }
}

/// The reply to a failed request: an error chunk for reads and block status under
/// structured replies, a simple reply otherwise.
fn error_reply(session: &Session, req: &Request, errno: u32, message: &str) -> Vec<Vec<u8>> {
    if session.structured && matches!(req.kind, CMD_READ | CMD_BLOCK_STATUS) {
        vec![error_chunk(req.cookie, errno, message)]
    } else {
        vec![simple_reply(req.cookie, errno).to_vec()]
    }
}

fn ok_reply(session: &Session, req: &Request) -> Vec<Vec<u8>> {
    if session.structured {
        vec![chunk_header(req.cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0).to_vec()]
    } else {
        vec![simple_reply(req.cookie, 0).to_vec()]
    }
}

/// Serves one request; returns the reply's pieces, sent in order.
/// For a read that succeeds, the data is left in `data` and the reply is its header alone.
fn serve(export: &Export, session: &Session, job: &Job, data: &mut Vec<u8>) -> Vec<Vec<u8>> {
    let req = &job.req;
    match check(export, session, req) {
        Err((errno, why)) => error_reply(session, req, errno, why),
        Ok(()) => match run_command(export, session, job, data) {
            Ok(reply) => reply,
            Err(e) => {
                tracing::debug!(
                    "nbd: request {} at {}+{}: {e}",
                    req.kind,
                    req.offset,
                    req.length
                );
                error_reply(session, req, errno_of(&e), &e.to_string())
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
) -> Result<Vec<Vec<u8>>, Error> {
    let req = &job.req;
    let disk = &export.disk;
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let len = u64::from(req.length);
    match req.kind {
        CMD_READ => {
            read(export, req.offset, len, data)?;
            let head = if session.structured {
                let mut h = chunk_header(
                    req.cookie,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_DATA,
                    8 + req.length,
                )
                .to_vec();
                h.extend_from_slice(&req.offset.to_be_bytes());
                h
            } else {
                simple_reply(req.cookie, 0).to_vec()
            };
            Ok(vec![head])
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
        CMD_BLOCK_STATUS => Ok(vec![block_status(export, session, req)]),
        _ => Err(Error::unsupported("command")),
    }
}

/// Reads `len` bytes at `offset`; an unaligned range is read through a bounce buffer
/// covering whole sectors.
fn read(export: &Export, offset: u64, len: u64, buf: &mut Vec<u8>) -> Result<(), Error> {
    let ls = u64::from(export.disk.info().logical_sector_size);
    let start = offset / ls * ls;
    let end = (offset + len).div_ceil(ls) * ls;
    let n = (end - start) as usize;
    if buf.len() < n {
        buf.resize(n, 0);
    }
    with_read_bufs(&mut [&mut buf[..n]], |b| export.disk.read(start, b))?;
    if start != offset {
        let at = (offset - start) as usize;
        buf.copy_within(at..at + len as usize, 0);
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
