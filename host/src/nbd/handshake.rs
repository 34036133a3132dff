//! The handshake: greeting, client flags, then options until `NBD_OPT_GO` or
//! `NBD_OPT_EXPORT_NAME` moves to transmission (or the client aborts or breaks the rules).
//!
//! Fixed newstyle only: a client that does not set `NBD_FLAG_C_FIXED_NEWSTYLE`, or sets a
//! flag this server does not know, is disconnected, as is one whose option does not start
//! with `IHAVEOPT`. An option's payload is read whole before it is parsed and is at most
//! [`MAX_OPTION`] bytes; every length inside it is checked against what is left.

use super::meta::{self, Context};
use super::server::Stream;
use super::wire::*;
use super::Export;
use std::io::{self, Read, Write};

/// The longest option payload read (names are at most 4096 bytes; a meta context request
/// with a few queries fits easily). A longer one is read, dropped and refused.
pub const MAX_OPTION: u32 = 64 * 1024;

/// The longest string (export name, query) the protocol allows.
pub const MAX_STRING: usize = 4096;

/// Options a client may send before it must go to transmission.
pub const MAX_OPTIONS: usize = 1024;

/// What the handshake agreed.
#[derive(Debug, Clone)]
pub struct Session {
    /// Structured replies negotiated.
    pub structured: bool,
    /// The selected meta contexts; a context's id is its index + 1.
    pub contexts: Vec<Context>,
}

/// How a handshake ended without transmission.
#[derive(Debug)]
pub enum Ended {
    /// The client sent `NBD_OPT_ABORT` or hung up between options.
    Quit,
    /// The client broke the protocol; the message says how (for the log).
    Broken(String),
    /// The socket failed.
    Io(io::Error),
}

impl From<io::Error> for Ended {
    fn from(e: io::Error) -> Self {
        Ended::Io(e)
    }
}

fn read_u32(s: &mut Stream) -> io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(s: &mut Stream) -> io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// Reads and drops `n` bytes.
fn drain(s: &mut Stream, mut n: u64) -> io::Result<()> {
    let mut buf = [0u8; 16 * 1024];
    while n > 0 {
        let k = n.min(buf.len() as u64) as usize;
        s.read_exact(&mut buf[..k])?;
        n -= k as u64;
    }
    Ok(())
}

/// A cursor over an option's payload whose reads fail, rather than panic, past its end.
struct Payload<'a>(&'a [u8]);

impl<'a> Payload<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(be16)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(be32)
    }
    /// A u32-length-prefixed string of at most [`MAX_STRING`] bytes.
    fn string(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return None;
        }
        self.take(n)
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Runs the handshake on `s` for `export`.
pub fn negotiate(s: &mut Stream, export: &Export) -> Result<Session, Ended> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let client = read_u32(s)?;
    if client & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(Ended::Broken(format!("unknown client flags {client:#x}")));
    }
    if client & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(Ended::Broken(
            "the client does not speak fixed newstyle".into(),
        ));
    }
    let no_zeroes = client & FLAG_C_NO_ZEROES != 0;
    let mut session = Session {
        structured: false,
        contexts: Vec::new(),
    };
    for _ in 0..MAX_OPTIONS {
        let magic = match read_u64(s) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(Ended::Quit),
            Err(e) => return Err(e.into()),
        };
        if magic != IHAVEOPT {
            return Err(Ended::Broken(format!("option magic {magic:#x}")));
        }
        let option = read_u32(s)?;
        let len = read_u32(s)?;
        if len > MAX_OPTION {
            drain(s, u64::from(len))?;
            if option == OPT_EXPORT_NAME {
                return Err(Ended::Broken(format!("an export name of {len} bytes")));
            }
            reply_err(s, option, REP_ERR_TOO_BIG, "option payload too large")?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        match option {
            OPT_EXPORT_NAME => {
                if data.len() > MAX_STRING || !export.answers_to(&data) {
                    return Err(Ended::Broken(
                        "NBD_OPT_EXPORT_NAME of an unknown export".into(),
                    ));
                }
                let mut v = Vec::with_capacity(134);
                v.extend_from_slice(&export.disk.size().to_be_bytes());
                v.extend_from_slice(&export.transmission_flags().to_be_bytes());
                if !no_zeroes {
                    v.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&v)?;
                return Ok(session);
            }
            OPT_ABORT => {
                // The protocol asks for an acknowledgement; the client may not wait for it.
                let _ = s.write_all(&option_reply(option, REP_ACK, &[]));
                return Err(Ended::Quit);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply_err(s, option, REP_ERR_INVALID, "LIST takes no data")?;
                    continue;
                }
                let name = export.name.as_bytes();
                let mut v = Vec::new();
                v.extend_from_slice(&(name.len() as u32).to_be_bytes());
                v.extend_from_slice(name);
                v.extend_from_slice(export.description.as_bytes());
                s.write_all(&option_reply(option, REP_SERVER, &v))?;
                s.write_all(&option_reply(option, REP_ACK, &[]))?;
            }
            OPT_STARTTLS => reply_err(s, option, REP_ERR_UNSUP, "TLS is not offered")?,
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply_err(s, option, REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")?;
                    continue;
                }
                session.structured = true;
                s.write_all(&option_reply(option, REP_ACK, &[]))?;
            }
            OPT_INFO | OPT_GO => {
                if info(s, option, &data, export)? && option == OPT_GO {
                    return Ok(session);
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = option == OPT_SET_META_CONTEXT;
                if set {
                    // Even a failed SET replaces the selection.
                    session.contexts.clear();
                }
                if !session.structured {
                    reply_err(
                        s,
                        option,
                        REP_ERR_INVALID,
                        "negotiate structured replies first",
                    )?;
                    continue;
                }
                match parse_meta(&data) {
                    None => {
                        reply_err(s, option, REP_ERR_INVALID, "malformed meta context request")?
                    }
                    Some((name, _)) if !export.answers_to(name) => {
                        reply_err(s, option, REP_ERR_UNKNOWN, "no such export")?
                    }
                    Some((_, queries)) => {
                        let chosen = choose(export, &queries, set);
                        for (i, c) in chosen.iter().enumerate() {
                            let id = if set { i as u32 + 1 } else { 0 };
                            let mut v = id.to_be_bytes().to_vec();
                            v.extend_from_slice(c.name(export).as_bytes());
                            s.write_all(&option_reply(option, REP_META_CONTEXT, &v))?;
                        }
                        if set {
                            session.contexts = chosen;
                        }
                        s.write_all(&option_reply(option, REP_ACK, &[]))?;
                    }
                }
            }
            _ => reply_err(s, option, REP_ERR_UNSUP, "unknown option")?,
        }
    }
    Err(Ended::Broken(format!("more than {MAX_OPTIONS} options")))
}

fn reply_err(s: &mut Stream, option: u32, kind: u32, message: &str) -> io::Result<()> {
    s.write_all(&option_reply(option, kind, message.as_bytes()))
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO`: answers and returns true when the export was accepted.
fn info(s: &mut Stream, option: u32, data: &[u8], export: &Export) -> io::Result<bool> {
    let mut p = Payload(data);
    let parsed = (|| {
        let name = p.string()?;
        let n = p.u16()? as usize;
        let mut wanted = Vec::with_capacity(n);
        for _ in 0..n {
            wanted.push(p.u16()?);
        }
        p.is_empty().then_some((name, wanted))
    })();
    let Some((name, wanted)) = parsed else {
        reply_err(s, option, REP_ERR_INVALID, "malformed INFO/GO request")?;
        return Ok(false);
    };
    if !export.answers_to(name) {
        reply_err(s, option, REP_ERR_UNKNOWN, "no such export")?;
        return Ok(false);
    }
    let mut v = INFO_EXPORT.to_be_bytes().to_vec();
    v.extend_from_slice(&export.disk.size().to_be_bytes());
    v.extend_from_slice(&export.transmission_flags().to_be_bytes());
    s.write_all(&option_reply(option, REP_INFO, &v))?;
    // Sent whether asked or not (the protocol allows it): the minimum is what writes need.
    let (min, preferred, max) = export.block_sizes();
    let mut v = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for x in [min, preferred, max] {
        v.extend_from_slice(&x.to_be_bytes());
    }
    s.write_all(&option_reply(option, REP_INFO, &v))?;
    if wanted.contains(&INFO_NAME) {
        let mut v = INFO_NAME.to_be_bytes().to_vec();
        v.extend_from_slice(export.name.as_bytes());
        s.write_all(&option_reply(option, REP_INFO, &v))?;
    }
    if wanted.contains(&INFO_DESCRIPTION) {
        let mut v = INFO_DESCRIPTION.to_be_bytes().to_vec();
        v.extend_from_slice(export.description.as_bytes());
        s.write_all(&option_reply(option, REP_INFO, &v))?;
    }
    s.write_all(&option_reply(option, REP_ACK, &[]))?;
    Ok(true)
}

/// A meta context request: (export name, queries), or `None` when malformed.
fn parse_meta(data: &[u8]) -> Option<(&[u8], Vec<String>)> {
    let mut p = Payload(data);
    let name = p.string()?;
    let n = p.u32()? as usize;
    // Each query takes at least its 4-byte length: a count beyond that is a lie.
    if n > data.len() / 4 {
        return None;
    }
    let mut queries = Vec::with_capacity(n);
    for _ in 0..n {
        queries.push(String::from_utf8(p.string()?.to_vec()).ok()?);
    }
    p.is_empty().then_some((name, queries))
}

/// The contexts a LIST (`set` false) or SET (`set` true) selects, without duplicates.
fn choose(export: &Export, queries: &[String], set: bool) -> Vec<Context> {
    let mut chosen: Vec<Context> = Vec::new();
    let mut add = |c: Context| {
        if !chosen.contains(&c) {
            chosen.push(c);
        }
    };
    if queries.is_empty() && !set {
        meta::all(export).into_iter().for_each(&mut add);
    }
    for q in queries {
        if set {
            if let Some(c) = meta::set_match(export, q) {
                add(c);
            }
        } else {
            meta::list_matches(export, q).into_iter().for_each(&mut add);
        }
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(name: &[u8], queries: &[&[u8]], count: u32) -> Vec<u8> {
        let mut v = (name.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(name);
        v.extend_from_slice(&count.to_be_bytes());
        for q in queries {
            v.extend_from_slice(&(q.len() as u32).to_be_bytes());
            v.extend_from_slice(q);
        }
        v
    }

    #[test]
    fn meta_context_requests_are_parsed_only_when_every_length_holds() {
        let ok = meta(b"x", &[b"base:allocation", b"qemu:"], 2);
        let (name, q) = parse_meta(&ok).unwrap();
        assert_eq!((name, q.len()), (&b"x"[..], 2));
        // A count larger than the queries sent, a huge count, trailing bytes, a query
        // length past the end, a query that is not UTF-8, a name over 4096 bytes: refused.
        assert!(parse_meta(&meta(b"x", &[b"base:"], 2)).is_none());
        assert!(parse_meta(&meta(b"x", &[], u32::MAX)).is_none());
        let mut trailing = meta(b"", &[], 0);
        trailing.push(0);
        assert!(parse_meta(&trailing).is_none());
        let mut cut = meta(b"", &[b"base:allocation"], 1);
        cut.truncate(cut.len() - 1);
        assert!(parse_meta(&cut).is_none());
        assert!(parse_meta(&meta(b"", &[&[0xff, 0xfe]], 1)).is_none());
        assert!(parse_meta(&meta(&[b'a'; 4097], &[], 0)).is_none());
    }
}
