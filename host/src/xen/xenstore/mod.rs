//! Xenstore: the client side the backend talks through, the wire protocol, and helpers.
//!
//! [`Xenstore`] is what a device needs: read, write, mkdir, rm, directory, permissions,
//! watches and transactions. [`client::XsClient`] implements it over xenstored's unix
//! socket or `/dev/xen/xenbus`; the simulator's xenstored speaks the same protocol, so the
//! backend cannot tell them apart. Values a guest wrote are hostile: read them with
//! [`read_string`] / [`read_u32`], which bound and parse them and name the path on error.

pub mod client;
pub mod mux;
pub mod wire;

use crossbeam_channel::Receiver;

/// A transaction id; [`NO_TX`] for none.
pub type TxId = u32;
/// Outside any transaction.
pub const NO_TX: TxId = 0;

/// What one domain may do with a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Nothing (`n`).
    None,
    /// Read (`r`).
    Read,
    /// Write (`w`).
    Write,
    /// Read and write (`b`).
    Both,
}

/// One permission entry. The first entry of a node names its owner (who may do anything)
/// and the access of every domain not listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perm {
    /// The domain.
    pub domid: u32,
    /// Its access.
    pub access: Access,
}

impl Perm {
    /// Parses `n0`, `r5`, `w3`, `b1`.
    pub fn parse(text: &str) -> Option<Perm> {
        let (c, id) = text.split_at_checked(1)?;
        let access = match c {
            "n" => Access::None,
            "r" => Access::Read,
            "w" => Access::Write,
            "b" => Access::Both,
            _ => return None,
        };
        Some(Perm {
            domid: id.parse().ok()?,
            access,
        })
    }
}

impl std::fmt::Display for Perm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = match self.access {
            Access::None => 'n',
            Access::Read => 'r',
            Access::Write => 'w',
            Access::Both => 'b',
        };
        write!(f, "{c}{}", self.domid)
    }
}

/// A xenstore error: the errno name xenstored answered (`ENOENT`, `EACCES`, `EAGAIN`...), or
/// a transport failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XsError {
    /// xenstored answered an error.
    #[error("xenstore {op} {path}: {errno}")]
    Errno {
        /// Operation.
        op: &'static str,
        /// Path (or other argument).
        path: String,
        /// The errno name.
        errno: String,
    },
    /// The connection failed.
    #[error("xenstore connection: {0}")]
    Io(String),
    /// A reply that does not parse.
    #[error("xenstore {op}: malformed reply")]
    Malformed {
        /// Operation.
        op: &'static str,
    },
}

impl XsError {
    /// The errno name, if xenstored answered one.
    pub fn errno(&self) -> Option<&str> {
        match self {
            XsError::Errno { errno, .. } => Some(errno),
            _ => None,
        }
    }

    /// The node does not exist.
    pub fn is_enoent(&self) -> bool {
        self.errno() == Some("ENOENT")
    }

    /// A transaction conflicted: retry it.
    pub fn is_eagain(&self) -> bool {
        self.errno() == Some("EAGAIN")
    }
}

/// A watch firing: the path that changed (or the watched path on registration) and the
/// token given to `watch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    /// The path.
    pub path: String,
    /// The token.
    pub token: String,
}

/// A xenstore connection.
pub trait Xenstore: Send + Sync {
    /// A node's value (`Err` with ENOENT when absent).
    fn read(&self, tx: TxId, path: &str) -> Result<Vec<u8>, XsError>;
    /// Sets a node's value, creating it and missing parents.
    fn write(&self, tx: TxId, path: &str, value: &[u8]) -> Result<(), XsError>;
    /// Creates a node (no error if it exists).
    fn mkdir(&self, tx: TxId, path: &str) -> Result<(), XsError>;
    /// Removes a node and everything below it (no error if absent).
    fn rm(&self, tx: TxId, path: &str) -> Result<(), XsError>;
    /// A node's children.
    fn directory(&self, tx: TxId, path: &str) -> Result<Vec<String>, XsError>;
    /// A node's permissions.
    fn get_perms(&self, tx: TxId, path: &str) -> Result<Vec<Perm>, XsError>;
    /// Sets a node's permissions.
    fn set_perms(&self, tx: TxId, path: &str, perms: &[Perm]) -> Result<(), XsError>;
    /// Watches a path and everything below it; fires once at once.
    fn watch(&self, path: &str, token: &str) -> Result<(), XsError>;
    /// Stops a watch.
    fn unwatch(&self, path: &str, token: &str) -> Result<(), XsError>;
    /// Starts a transaction.
    fn transaction_start(&self) -> Result<TxId, XsError>;
    /// Commits (or aborts) a transaction; a conflict is an EAGAIN error.
    fn transaction_end(&self, tx: TxId, commit: bool) -> Result<(), XsError>;
    /// `/local/domain/<domid>`.
    fn get_domain_path(&self, domid: u32) -> Result<String, XsError>;
    /// Where watch events arrive.
    fn events(&self) -> Receiver<WatchEvent>;
}

/// How many times [`transaction`] retries a conflicting transaction.
pub const TRANSACTION_RETRIES: usize = 16;

/// Runs `body` in a transaction, retrying on EAGAIN. `body` may run several times.
pub fn transaction<T>(
    xs: &dyn Xenstore,
    mut body: impl FnMut(TxId) -> Result<T, XsError>,
) -> Result<T, XsError> {
    let mut last = None;
    for _ in 0..TRANSACTION_RETRIES {
        let tx = xs.transaction_start()?;
        match body(tx) {
            Ok(v) => match xs.transaction_end(tx, true) {
                Ok(()) => return Ok(v),
                Err(e) if e.is_eagain() => last = Some(e),
                Err(e) => return Err(e),
            },
            Err(e) => {
                let _ = xs.transaction_end(tx, false);
                return Err(e);
            }
        }
    }
    Err(last.unwrap_or(XsError::Io("transaction retries exhausted".into())))
}

/// Longest value accepted from a guest-writable node by the helpers below.
pub const GUEST_VALUE_MAX: usize = 256;

/// Why a guest-writable node could not be read as a value: each case names the path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// Longer than [`GUEST_VALUE_MAX`].
    #[error("{path}: value of {len} bytes is too long")]
    TooLong {
        /// The node.
        path: String,
        /// Its length.
        len: usize,
    },
    /// Not UTF-8.
    #[error("{path}: value is not text")]
    NotText {
        /// The node.
        path: String,
    },
    /// Not a decimal number.
    #[error("{path}: `{}` is not a number", value.escape_debug())]
    NotNumber {
        /// The node.
        path: String,
        /// What it holds.
        value: String,
    },
    /// Digits, but beyond a u32.
    #[error("{path}: {value} is out of range")]
    OutOfRange {
        /// The node.
        path: String,
        /// What it holds.
        value: String,
    },
    /// xenstore failed (the message names the path).
    #[error(transparent)]
    Xenstore(#[from] XsError),
}

/// A node's value as text: `Ok(None)` when absent; an error naming the path when it is not
/// UTF-8 or longer than [`GUEST_VALUE_MAX`].
pub fn read_string(xs: &dyn Xenstore, tx: TxId, path: &str) -> Result<Option<String>, ReadError> {
    match xs.read(tx, path) {
        Ok(v) if v.len() > GUEST_VALUE_MAX => Err(ReadError::TooLong {
            path: path.to_string(),
            len: v.len(),
        }),
        Ok(v) => String::from_utf8(v)
            .map(|s| Some(s.trim().to_string()))
            .map_err(|_| ReadError::NotText {
                path: path.to_string(),
            }),
        Err(e) if e.is_enoent() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// A node's value as a decimal u32: `Ok(None)` when absent.
pub fn read_u32(xs: &dyn Xenstore, tx: TxId, path: &str) -> Result<Option<u32>, ReadError> {
    match read_string(xs, tx, path)? {
        None => Ok(None),
        Some(s) if !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse().map(Some).map_err(|_| ReadError::OutOfRange {
                path: path.to_string(),
                value: s,
            })
        }
        Some(s) => Err(ReadError::NotNumber {
            path: path.to_string(),
            value: s,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perms_parse_and_print() {
        for s in ["n0", "r5", "w3", "b12"] {
            assert_eq!(Perm::parse(s).unwrap().to_string(), s);
        }
        for bad in ["", "x1", "r", "r-1", "rr"] {
            assert_eq!(Perm::parse(bad), None, "{bad}");
        }
    }
}
