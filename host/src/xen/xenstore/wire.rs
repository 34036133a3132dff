//! The xenstore wire protocol (`io/xs_wire.h`): a 16-byte header of host-endian u32s
//! (`type`, `req_id`, `tx_id`, `len`) and at most 4096 payload bytes. The same framing runs
//! over xenstored's unix socket and `/dev/xen/xenbus`.

use std::io::{self, Read, Write};

/// Header bytes.
pub const HEADER_SIZE: usize = 16;
/// Largest payload (XENSTORE_PAYLOAD_MAX); a peer that sends more is dropped.
pub const PAYLOAD_MAX: usize = 4096;
/// Longest absolute path.
pub const ABS_PATH_MAX: usize = 3072;

/// Message types.
#[allow(missing_docs)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum MsgType {
    Control = 0,
    Directory = 1,
    Read = 2,
    GetPerms = 3,
    Watch = 4,
    Unwatch = 5,
    TransactionStart = 6,
    TransactionEnd = 7,
    Introduce = 8,
    Release = 9,
    GetDomainPath = 10,
    Write = 11,
    Mkdir = 12,
    Rm = 13,
    SetPerms = 14,
    WatchEvent = 15,
    Error = 16,
    IsDomainIntroduced = 17,
    Resume = 18,
    SetTarget = 19,
    ResetWatches = 21,
    DirectoryPart = 22,
    GetFeature = 23,
    SetFeature = 24,
    GetQuota = 25,
    SetQuota = 26,
}

impl MsgType {
    /// The type for a wire value.
    pub fn from_u32(v: u32) -> Option<MsgType> {
        use MsgType::*;
        Some(match v {
            0 => Control,
            1 => Directory,
            2 => Read,
            3 => GetPerms,
            4 => Watch,
            5 => Unwatch,
            6 => TransactionStart,
            7 => TransactionEnd,
            8 => Introduce,
            9 => Release,
            10 => GetDomainPath,
            11 => Write,
            12 => Mkdir,
            13 => Rm,
            14 => SetPerms,
            15 => WatchEvent,
            16 => Error,
            17 => IsDomainIntroduced,
            18 => Resume,
            19 => SetTarget,
            21 => ResetWatches,
            22 => DirectoryPart,
            23 => GetFeature,
            24 => SetFeature,
            25 => GetQuota,
            26 => SetQuota,
            _ => return None,
        })
    }
}

/// One message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Raw type (kept raw: an unknown type must get an error reply, not a dropped peer).
    pub ty: u32,
    /// Echoed in the reply.
    pub req_id: u32,
    /// Transaction, 0 for none.
    pub tx_id: u32,
    /// Payload.
    pub payload: Vec<u8>,
}

impl Message {
    /// A message of a known type.
    pub fn new(ty: MsgType, req_id: u32, tx_id: u32, payload: Vec<u8>) -> Message {
        Message {
            ty: ty as u32,
            req_id,
            tx_id,
            payload,
        }
    }

    /// The known type, if any.
    pub fn kind(&self) -> Option<MsgType> {
        MsgType::from_u32(self.ty)
    }

    /// Writes the message; refuses payloads over the limit.
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        if self.payload.len() > PAYLOAD_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "xenstore payload over 4096 bytes",
            ));
        }
        let mut buf = Vec::with_capacity(HEADER_SIZE + self.payload.len());
        for v in [self.ty, self.req_id, self.tx_id, self.payload.len() as u32] {
            buf.extend_from_slice(&v.to_ne_bytes());
        }
        buf.extend_from_slice(&self.payload);
        w.write_all(&buf)
    }

    /// Reads one message; a header announcing more than the limit is an error (the caller
    /// drops the connection, as xenstored does).
    pub fn read_from(r: &mut impl Read) -> io::Result<Message> {
        let mut h = [0u8; HEADER_SIZE];
        r.read_exact(&mut h)?;
        let word = |i: usize| u32::from_ne_bytes(h[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
        let len = word(3) as usize;
        if len > PAYLOAD_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("xenstore payload of {len} bytes"),
            ));
        }
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload)?;
        Ok(Message {
            ty: word(0),
            req_id: word(1),
            tx_id: word(2),
            payload,
        })
    }
}

/// Splits a payload of NUL-terminated strings.
pub fn split_strings(payload: &[u8]) -> Vec<&[u8]> {
    let mut parts: Vec<&[u8]> = payload.split(|&b| b == 0).collect();
    if payload.last() == Some(&0) {
        parts.pop();
    }
    parts
}

/// Joins strings, each NUL-terminated.
pub fn join_strings<S: AsRef<[u8]>>(parts: &[S]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        out.extend_from_slice(p.as_ref());
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_oversize_is_refused() {
        let m = Message::new(MsgType::Write, 7, 3, b"/a/b\0value".to_vec());
        let mut buf = Vec::new();
        m.write_to(&mut buf).unwrap();
        assert_eq!(buf.len(), 16 + 10);
        assert_eq!(Message::read_from(&mut &buf[..]).unwrap(), m);
        let big = Message::new(MsgType::Write, 1, 0, vec![b'x'; 4097]);
        assert!(big.write_to(&mut Vec::new()).is_err());
        let mut header = Vec::new();
        for v in [11u32, 1, 0, 5000] {
            header.extend_from_slice(&v.to_ne_bytes());
        }
        assert!(Message::read_from(&mut &header[..]).is_err());
        assert_eq!(split_strings(b"a\0b\0"), vec![&b"a"[..], &b"b"[..]]);
        assert_eq!(join_strings(&["x", "y"]), b"x\0y\0");
    }
}
