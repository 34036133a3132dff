//! A xenstore client over a byte stream: xenstored's unix socket (`$XENSTORED_PATH`, else
//! `/var/run/xenstored/socket`) or the kernel's `/dev/xen/xenbus`.
//!
//! Requests may be issued from any thread. A reader thread matches replies to requests by
//! `req_id` and sends watch events to [`Xenstore::events`]; on `/dev/xen/xenbus` watch events
//! carry no meaningful `req_id`, so events are recognised by type, never by id.

use super::wire::{join_strings, split_strings, Message, MsgType};
use super::{Perm, TxId, WatchEvent, Xenstore, XsError};
use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The default xenstored socket.
pub const DEFAULT_SOCKET: &str = "/var/run/xenstored/socket";
/// The kernel's xenstore device.
pub const XENBUS_DEVICE: &str = "/dev/xen/xenbus";
/// How long a request waits for its reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

type Pending = Arc<Mutex<HashMap<u32, Sender<Message>>>>;

/// Requests this process's clients sent (the metrics' `xen_disk_xenstore_requests_total`):
/// what the daemon asks of xenstored, which an idle dom0 should barely notice. Clients made
/// [`XsClient::uncounted`] (simulated guests in the same process) are left out.
pub static REQUESTS: AtomicU64 = AtomicU64::new(0);

/// A connection to xenstored.
pub struct XsClient {
    writer: Mutex<Box<dyn Write + Send>>,
    pending: Pending,
    next_id: AtomicU32,
    events: Receiver<WatchEvent>,
    shutdown: Option<UnixStream>,
    /// `/dev/xen/xenbus` wants exactly `T\0`/`F\0` to end transactions (as the socket does too).
    what: String,
    /// Its requests count in [`REQUESTS`].
    counted: bool,
}

impl XsClient {
    /// Connects to a xenstored unix socket.
    pub fn connect_unix(path: &Path) -> Result<XsClient, XsError> {
        let stream = UnixStream::connect(path)
            .map_err(|e| XsError::Io(format!("{}: {e}", path.display())))?;
        let reader = stream.try_clone().map_err(|e| XsError::Io(e.to_string()))?;
        let shutdown = stream.try_clone().map_err(|e| XsError::Io(e.to_string()))?;
        Ok(Self::start(
            Box::new(stream),
            reader,
            Some(shutdown),
            path.display().to_string(),
        ))
    }

    /// Uses an already connected stream (e.g. one end of a socket pair).
    pub fn from_stream(stream: UnixStream) -> Result<XsClient, XsError> {
        let reader = stream.try_clone().map_err(|e| XsError::Io(e.to_string()))?;
        let shutdown = stream.try_clone().map_err(|e| XsError::Io(e.to_string()))?;
        Ok(Self::start(
            Box::new(stream),
            reader,
            Some(shutdown),
            "xenstore".into(),
        ))
    }

    /// Opens the kernel's xenstore device.
    pub fn open_xenbus(path: &Path) -> Result<XsClient, XsError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| XsError::Io(format!("{}: {e}", path.display())))?;
        let reader = file.try_clone().map_err(|e| XsError::Io(e.to_string()))?;
        Ok(Self::start(
            Box::new(file),
            reader,
            None,
            path.display().to_string(),
        ))
    }

    /// `$XENSTORED_PATH`, else the default socket, else `/dev/xen/xenbus`.
    pub fn open_default() -> Result<XsClient, XsError> {
        if let Some(p) = std::env::var_os("XENSTORED_PATH") {
            return Self::connect_unix(&PathBuf::from(p));
        }
        if Path::new(DEFAULT_SOCKET).exists() {
            return Self::connect_unix(Path::new(DEFAULT_SOCKET));
        }
        if Path::new(XENBUS_DEVICE).exists() {
            return Self::open_xenbus(Path::new(XENBUS_DEVICE));
        }
        Err(XsError::Io(format!(
            "no xenstore here: neither {DEFAULT_SOCKET} nor {XENBUS_DEVICE} exists (not a Xen domain? use --sim)"
        )))
    }

    fn start(
        writer: Box<dyn Write + Send>,
        mut reader: impl std::io::Read + Send + 'static,
        shutdown: Option<UnixStream>,
        what: String,
    ) -> XsClient {
        let pending: Pending = Arc::default();
        let (events_tx, events) = unbounded();
        let p = pending.clone();
        std::thread::Builder::new()
            .name("xenstore-reader".into())
            .spawn(move || {
                while let Ok(msg) = Message::read_from(&mut reader) {
                    if msg.kind() == Some(MsgType::WatchEvent) {
                        let parts = split_strings(&msg.payload);
                        if let [path, token, ..] = parts.as_slice() {
                            let _ = events_tx.send(WatchEvent {
                                path: String::from_utf8_lossy(path).into_owned(),
                                token: String::from_utf8_lossy(token).into_owned(),
                            });
                        }
                        continue;
                    }
                    let waiter = p
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&msg.req_id);
                    if let Some(w) = waiter {
                        let _ = w.send(msg);
                    }
                }
                // Connection gone: dropping the waiters' senders fails their requests.
                p.lock().unwrap_or_else(|e| e.into_inner()).clear();
            })
            .expect("spawn the xenstore reader thread");
        XsClient {
            writer: Mutex::new(writer),
            pending,
            next_id: AtomicU32::new(1),
            events,
            shutdown,
            what,
            counted: true,
        }
    }

    /// This client's requests are not the daemon's: they stay out of [`REQUESTS`].
    pub fn uncounted(mut self) -> XsClient {
        self.counted = false;
        self
    }

    fn request(
        &self,
        op: &'static str,
        ty: MsgType,
        tx: TxId,
        payload: Vec<u8>,
        arg: &str,
    ) -> Result<Vec<u8>, XsError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if self.counted {
            REQUESTS.fetch_add(1, Ordering::Relaxed);
        }
        let (tx_reply, rx_reply) = bounded(1);
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx_reply);
        let msg = Message::new(ty, id, tx, payload);
        let sent = {
            let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            msg.write_to(&mut *w).and_then(|_| w.flush())
        };
        if let Err(e) = sent {
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            return Err(XsError::Io(format!("{}: {e}", self.what)));
        }
        let reply = rx_reply.recv_timeout(REPLY_TIMEOUT).map_err(|_| {
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            XsError::Io(format!("{}: no reply to {op} {arg}", self.what))
        })?;
        if reply.kind() == Some(MsgType::Error) {
            let errno = split_strings(&reply.payload)
                .first()
                .map(|e| String::from_utf8_lossy(e).into_owned());
            return Err(XsError::Errno {
                op,
                path: arg.to_string(),
                errno: errno.unwrap_or_else(|| "EIO".into()),
            });
        }
        Ok(reply.payload)
    }
}

impl Drop for XsClient {
    fn drop(&mut self) {
        if let Some(s) = &self.shutdown {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn path_arg(path: &str) -> Vec<u8> {
    join_strings(&[path])
}

impl Xenstore for XsClient {
    fn read(&self, tx: TxId, path: &str) -> Result<Vec<u8>, XsError> {
        self.request("read", MsgType::Read, tx, path_arg(path), path)
    }

    fn write(&self, tx: TxId, path: &str, value: &[u8]) -> Result<(), XsError> {
        let mut payload = path_arg(path);
        payload.extend_from_slice(value);
        self.request("write", MsgType::Write, tx, payload, path)
            .map(drop)
    }

    fn mkdir(&self, tx: TxId, path: &str) -> Result<(), XsError> {
        self.request("mkdir", MsgType::Mkdir, tx, path_arg(path), path)
            .map(drop)
    }

    fn rm(&self, tx: TxId, path: &str) -> Result<(), XsError> {
        match self.request("rm", MsgType::Rm, tx, path_arg(path), path) {
            Err(e) if e.is_enoent() => Ok(()),
            other => other.map(drop),
        }
    }

    fn directory(&self, tx: TxId, path: &str) -> Result<Vec<String>, XsError> {
        let reply = self.request("directory", MsgType::Directory, tx, path_arg(path), path)?;
        Ok(split_strings(&reply)
            .into_iter()
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect())
    }

    fn get_perms(&self, tx: TxId, path: &str) -> Result<Vec<Perm>, XsError> {
        let reply = self.request("get-perms", MsgType::GetPerms, tx, path_arg(path), path)?;
        split_strings(&reply)
            .into_iter()
            .map(|p| {
                std::str::from_utf8(p)
                    .ok()
                    .and_then(Perm::parse)
                    .ok_or(XsError::Malformed { op: "get-perms" })
            })
            .collect()
    }

    fn set_perms(&self, tx: TxId, path: &str, perms: &[Perm]) -> Result<(), XsError> {
        let mut parts = vec![path.to_string()];
        parts.extend(perms.iter().map(Perm::to_string));
        self.request(
            "set-perms",
            MsgType::SetPerms,
            tx,
            join_strings(&parts),
            path,
        )
        .map(drop)
    }

    fn watch(&self, path: &str, token: &str) -> Result<(), XsError> {
        self.request(
            "watch",
            MsgType::Watch,
            0,
            join_strings(&[path, token]),
            path,
        )
        .map(drop)
    }

    fn unwatch(&self, path: &str, token: &str) -> Result<(), XsError> {
        self.request(
            "unwatch",
            MsgType::Unwatch,
            0,
            join_strings(&[path, token]),
            path,
        )
        .map(drop)
    }

    fn transaction_start(&self) -> Result<TxId, XsError> {
        let reply = self.request(
            "transaction-start",
            MsgType::TransactionStart,
            0,
            vec![0],
            "",
        )?;
        let text = split_strings(&reply)
            .first()
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .unwrap_or_default();
        text.parse().map_err(|_| XsError::Malformed {
            op: "transaction-start",
        })
    }

    fn transaction_end(&self, tx: TxId, commit: bool) -> Result<(), XsError> {
        let body = if commit {
            b"T\0".to_vec()
        } else {
            b"F\0".to_vec()
        };
        self.request("transaction-end", MsgType::TransactionEnd, tx, body, "")
            .map(drop)
    }

    fn get_domain_path(&self, domid: u32) -> Result<String, XsError> {
        let reply = self.request(
            "get-domain-path",
            MsgType::GetDomainPath,
            0,
            path_arg(&domid.to_string()),
            "",
        )?;
        split_strings(&reply)
            .first()
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .ok_or(XsError::Malformed {
                op: "get-domain-path",
            })
    }

    fn events(&self) -> Receiver<WatchEvent> {
        self.events.clone()
    }
}
