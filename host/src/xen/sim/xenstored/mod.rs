//! The simulated xenstored: the same wire protocol as the real one, over unix sockets or
//! in-process socket pairs, so the backend, the Rust frontend and Xen's own C tools
//! (`xenstore-read`, `xenstore-ls`, ... with `XENSTORED_PATH`) all talk to it unchanged.
//!
//! - An in-memory [`tree`] with per-node permissions, enforced per connection: a connection
//!   on a domain's socket acts as that domain, the main socket as dom0.
//! - Watches fire once on registration and then on every change at or below their path;
//!   changes made in a transaction fire only when it commits.
//! - Transactions work on a snapshot; a commit after any other change answers EAGAIN.
//! - `@introduceDomain` / `@releaseDomain` fire when the simulator adds or destroys a domain.
//! - A peer that announces more than 4096 payload bytes is disconnected; the server goes on.

pub mod tree;

use crate::xen::xenstore::client::XsClient;
use crate::xen::xenstore::wire::{join_strings, split_strings, Message, MsgType};
use crate::xen::xenstore::{Access, Perm};
use crossbeam_channel::{unbounded, Sender};
use std::collections::HashMap;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use tree::{is_at_or_below, valid_path, Errno, Tree};

struct Watch {
    conn: u64,
    path: String,
    token: String,
}

struct Transaction {
    conn: u64,
    tree: Tree,
    base_generation: u64,
    changed: Vec<String>,
}

struct Conn {
    domid: u32,
    out: Sender<Message>,
}

#[derive(Default)]
struct State {
    tree: Tree,
    generation: u64,
    transactions: HashMap<u32, Transaction>,
    next_tx: u32,
    watches: Vec<Watch>,
    conns: HashMap<u64, Conn>,
    next_conn: u64,
    domains: HashMap<u32, String>,
}

impl State {
    /// Sends watch events for changed paths to every watch at or above them.
    fn fire(&self, changed: &[String]) {
        for w in &self.watches {
            let Some(conn) = self.conns.get(&w.conn) else {
                continue;
            };
            for p in changed {
                let hit = if w.path.starts_with('@') {
                    *p == w.path
                } else {
                    is_at_or_below(p, &w.path)
                };
                let visible = self
                    .tree
                    .get(p)
                    .is_none_or(|n| tree::allowed(&n.perms, conn.domid, Access::Read));
                if hit && visible {
                    let _ = conn.out.send(event(p, &w.token));
                }
            }
        }
    }
}

fn event(path: &str, token: &str) -> Message {
    Message::new(MsgType::WatchEvent, 0, 0, join_strings(&[path, token]))
}

fn reply(req: &Message, payload: Vec<u8>) -> Message {
    Message {
        ty: req.ty,
        req_id: req.req_id,
        tx_id: req.tx_id,
        payload,
    }
}

fn error(req: &Message, errno: Errno) -> Message {
    Message {
        ty: MsgType::Error as u32,
        req_id: req.req_id,
        tx_id: req.tx_id,
        payload: join_strings(&[errno]),
    }
}

fn ok(req: &Message) -> Message {
    reply(req, b"OK\0".to_vec())
}

/// A simulated xenstored. Clone it freely: clones share the store.
#[derive(Clone, Default)]
pub struct SimXenstored {
    state: Arc<Mutex<State>>,
}

impl SimXenstored {
    /// A store holding dom0 (`/local/domain/0`, name `Domain-0`).
    pub fn new() -> SimXenstored {
        let s = SimXenstored::default();
        {
            let mut st = s.lock();
            for (path, value) in [
                ("/local/domain/0/name", "Domain-0"),
                ("/local/domain/0/domid", "0"),
                ("/vm", ""),
                ("/tool", ""),
            ] {
                st.tree
                    .write(path, value.as_bytes(), 0)
                    .expect("fresh tree");
            }
            st.domains.insert(0, "Domain-0".into());
        }
        s
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves connections on a unix socket at `path`; each connection acts as `domid`.
    /// Returns once listening; connections are served on their own threads.
    pub fn listen(&self, path: &Path, domid: u32) -> std::io::Result<()> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("sim-xenstored".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    me.serve(stream, domid);
                }
            })?;
        Ok(())
    }

    /// A client connected in-process, acting as `domid`.
    pub fn connect(&self, domid: u32) -> std::io::Result<XsClient> {
        let (ours, theirs) = UnixStream::pair()?;
        self.serve(ours, domid);
        XsClient::from_stream(theirs).map_err(|e| std::io::Error::other(e.to_string()))
    }

    /// Serves one connection on two threads (requests in, replies and events out).
    fn serve(&self, stream: UnixStream, domid: u32) {
        let (out, outgoing) = unbounded::<Message>();
        let id = {
            let mut st = self.lock();
            st.next_conn += 1;
            let id = st.next_conn;
            st.conns.insert(
                id,
                Conn {
                    domid,
                    out: out.clone(),
                },
            );
            id
        };
        let Ok(mut writer) = stream.try_clone() else {
            return;
        };
        // Named, so that a measurement of the daemon can leave the simulator's share out.
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .is_ok()
        };
        let writing = spawn(
            "sim-xenstored-w",
            Box::new(move || {
                for msg in outgoing.iter() {
                    if msg.write_to(&mut writer).is_err() {
                        break;
                    }
                }
            }),
        );
        let me = self.clone();
        let reading = writing
            && spawn(
                "sim-xenstored-r",
                Box::new(move || {
                    let mut reader = stream;
                    // An oversized or truncated message ends the connection (as xenstored
                    // does).
                    while let Ok(msg) = Message::read_from(&mut reader) {
                        let answer = me.handle(id, domid, &msg);
                        if out.send(answer).is_err() {
                            break;
                        }
                    }
                    let _ = reader.shutdown(std::net::Shutdown::Both);
                    let mut st = me.lock();
                    st.conns.remove(&id);
                    st.watches.retain(|w| w.conn != id);
                    st.transactions.retain(|_, t| t.conn != id);
                }),
            );
        if !reading {
            // No thread to serve it: the connection is dropped, as on any other failure.
            let mut st = self.lock();
            st.conns.remove(&id);
        }
    }

    /// Answers one request from connection `conn` acting as `domid`.
    fn handle(&self, conn: u64, domid: u32, req: &Message) -> Message {
        let args = split_strings(&req.payload);
        let text = |i: usize| args.get(i).and_then(|a| std::str::from_utf8(a).ok());
        let mut st = self.lock();
        let st = &mut *st;
        let Some(kind) = req.kind() else {
            return error(req, "EINVAL");
        };
        match kind {
            MsgType::TransactionStart => {
                st.next_tx = st.next_tx.wrapping_add(1).max(1);
                let id = st.next_tx;
                let tx = Transaction {
                    conn,
                    tree: st.tree.clone(),
                    base_generation: st.generation,
                    changed: Vec::new(),
                };
                st.transactions.insert(id, tx);
                reply(req, join_strings(&[id.to_string()]))
            }
            MsgType::TransactionEnd => {
                let Some(tx) = st
                    .transactions
                    .remove(&req.tx_id)
                    .filter(|t| t.conn == conn)
                else {
                    return error(req, "ENOENT");
                };
                match text(0) {
                    Some("F") => ok(req),
                    Some("T") if tx.base_generation != st.generation => error(req, "EAGAIN"),
                    Some("T") => {
                        st.tree = tx.tree;
                        if !tx.changed.is_empty() {
                            st.generation += 1;
                            st.fire(&tx.changed);
                        }
                        ok(req)
                    }
                    _ => error(req, "EINVAL"),
                }
            }
            MsgType::Watch | MsgType::Unwatch => {
                let (Some(path), Some(token)) = (text(0), text(1)) else {
                    return error(req, "EINVAL");
                };
                if !path.starts_with('@') && !valid_path(path) {
                    return error(req, "EINVAL");
                }
                if kind == MsgType::Watch {
                    st.watches.push(Watch {
                        conn,
                        path: path.into(),
                        token: token.into(),
                    });
                    // The registration event goes out after the OK (same queue, in order).
                    if let Some(c) = st.conns.get(&conn) {
                        let _ = c.out.send(ok(req));
                        return event(path, token);
                    }
                    ok(req)
                } else {
                    let before = st.watches.len();
                    st.watches
                        .retain(|w| !(w.conn == conn && w.path == path && w.token == token));
                    if st.watches.len() == before {
                        error(req, "ENOENT")
                    } else {
                        ok(req)
                    }
                }
            }
            MsgType::ResetWatches => {
                st.watches.retain(|w| w.conn != conn);
                ok(req)
            }
            MsgType::GetDomainPath => match text(0).and_then(|d| d.parse::<u32>().ok()) {
                Some(d) => reply(req, join_strings(&[format!("/local/domain/{d}")])),
                None => error(req, "EINVAL"),
            },
            MsgType::IsDomainIntroduced => match text(0).and_then(|d| d.parse::<u32>().ok()) {
                Some(d) => reply(
                    req,
                    join_strings(&[if st.domains.contains_key(&d) {
                        "T"
                    } else {
                        "F"
                    }]),
                ),
                None => error(req, "EINVAL"),
            },
            MsgType::Read
            | MsgType::Write
            | MsgType::Mkdir
            | MsgType::Rm
            | MsgType::Directory
            | MsgType::GetPerms
            | MsgType::SetPerms => {
                let Some(path) = text(0).filter(|p| valid_path(p)) else {
                    return error(req, "EINVAL");
                };
                let in_tx = req.tx_id != 0;
                let (tree, generation_changes) = if in_tx {
                    match st
                        .transactions
                        .get_mut(&req.tx_id)
                        .filter(|t| t.conn == conn)
                    {
                        Some(t) => (&mut t.tree, None),
                        None => return error(req, "ENOENT"),
                    }
                } else {
                    (&mut st.tree, Some(()))
                };
                let result: Result<(Message, Vec<String>), Errno> = match kind {
                    MsgType::Read => tree
                        .read(path, domid)
                        .map(|n| (reply(req, n.value.clone()), vec![])),
                    MsgType::Directory => tree
                        .read(path, domid)
                        .map(|_| (reply(req, join_strings(&tree.children(path))), vec![])),
                    MsgType::GetPerms => tree.read(path, domid).map(|n| {
                        let perms: Vec<String> = n.perms.iter().map(Perm::to_string).collect();
                        (reply(req, join_strings(&perms)), vec![])
                    }),
                    MsgType::Write => {
                        // The value is everything after the path's NUL, byte for byte; a
                        // payload without that NUL is malformed.
                        match req.payload.get(path.len()) {
                            Some(0) => {
                                let value = &req.payload[path.len() + 1..];
                                tree.write(path, value, domid).map(|c| (ok(req), c))
                            }
                            _ => Err("EINVAL"),
                        }
                    }
                    MsgType::Mkdir => tree.create(path, domid).map(|c| (ok(req), c)),
                    MsgType::Rm => tree.remove(path, domid).map(|c| (ok(req), c)),
                    MsgType::SetPerms => {
                        let perms: Option<Vec<Perm>> = args[1..]
                            .iter()
                            .map(|a| std::str::from_utf8(a).ok().and_then(Perm::parse))
                            .collect();
                        match perms {
                            Some(p) => tree
                                .set_perms(path, p, domid)
                                .map(|_| (ok(req), vec![path.to_string()])),
                            None => Err("EINVAL"),
                        }
                    }
                    _ => unreachable!("matched above"),
                };
                match result {
                    Err(e) => error(req, e),
                    Ok((answer, changed)) => {
                        if changed.is_empty() {
                            return answer;
                        }
                        if generation_changes.is_some() {
                            st.generation += 1;
                            st.fire(&changed);
                        } else if let Some(t) = st.transactions.get_mut(&req.tx_id) {
                            t.changed.extend(changed);
                        }
                        answer
                    }
                }
            }
            _ => error(req, "ENOSYS"),
        }
    }

    /// Adds a domain as libxl lays it out (`/local/domain/<id>/{name,domid,vm,device}`,
    /// `/vm/<uuid>/{name,uuid}`, owned by the domain, dom0 reading) and fires
    /// `@introduceDomain`.
    pub fn add_domain(&self, domid: u32, name: &str, uuid: &str) {
        let mut st = self.lock();
        let dom = format!("/local/domain/{domid}");
        let vm = format!("/vm/{uuid}");
        let mut changed = Vec::new();
        for (path, value) in [
            (format!("{dom}/name"), name),
            (format!("{dom}/domid"), &domid.to_string()),
            (format!("{dom}/vm"), &vm),
            (format!("{dom}/device"), ""),
            (format!("{vm}/name"), name),
            (format!("{vm}/uuid"), uuid),
        ] {
            changed.extend(
                st.tree
                    .write(&path, value.as_bytes(), 0)
                    .expect("dom0 writes"),
            );
        }
        let perms = vec![
            Perm {
                domid,
                access: Access::None,
            },
            Perm {
                domid: 0,
                access: Access::Read,
            },
        ];
        for p in [
            dom.clone(),
            format!("{dom}/name"),
            format!("{dom}/domid"),
            format!("{dom}/vm"),
            format!("{dom}/device"),
        ] {
            st.tree
                .set_perms(&p, perms.clone(), 0)
                .expect("node just written");
        }
        st.domains.insert(domid, name.to_string());
        st.generation += 1;
        changed.push("@introduceDomain".into());
        st.fire(&changed);
    }

    /// Destroys a domain: removes `/local/domain/<id>` and fires `@releaseDomain`.
    pub fn destroy_domain(&self, domid: u32) {
        let mut st = self.lock();
        let mut changed = st
            .tree
            .remove(&format!("/local/domain/{domid}"), 0)
            .unwrap_or_default();
        st.domains.remove(&domid);
        st.generation += 1;
        changed.push("@releaseDomain".into());
        st.fire(&changed);
    }
}

/// `xen-disk-host sim xenstored --socket PATH`: serves dom0 connections until killed.
pub fn run_xenstored(socket: &Path) -> anyhow::Result<()> {
    let xs = SimXenstored::new();
    xs.listen(socket, 0)
        .map_err(|e| anyhow::anyhow!("{}: {e}", socket.display()))?;
    eprintln!("simulated xenstored listening on {}", socket.display());
    loop {
        std::thread::park();
    }
}
