//! One xenstore connection shared by every device of a daemon.
//!
//! A connection costs a socket (or a `/dev/xen/xenbus` handle) and a reader thread; with one
//! per device, a dom0 serving hundreds of disks held hundreds of each for connections that
//! are idle nearly all the time. Requests need no help to share a connection (each waits
//! for the answer with its own request id); watch events do: they arrive on the
//! connection's one queue. [`XsMux`] reads that queue on one thread and hands each event to
//! the [`MuxView`] that registered its token, so each user still sees only its own
//! events, as with a connection of its own. Each view's tokens go to xenstored prefixed
//! with the view's number, so two views may use the same token (a device started again at
//! the same place while the old one still unwatches) as two connections could.

use super::{Perm, TxId, WatchEvent, Xenstore, XsError};
use crossbeam_channel::{unbounded, Receiver, Sender};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

type Routes = Arc<Mutex<HashMap<String, Sender<WatchEvent>>>>;

/// A shared connection; [`XsMux::view`] gives each user its own.
pub struct XsMux {
    inner: Arc<dyn Xenstore + Send>,
    routes: Routes,
    views: AtomicU64,
}

impl XsMux {
    /// Shares `inner`, routing its watch events by token from a thread of its own (which
    /// ends with the connection).
    pub fn new(inner: Box<dyn Xenstore + Send>) -> Result<Arc<XsMux>, XsError> {
        let inner: Arc<dyn Xenstore + Send> = Arc::from(inner);
        let routes: Routes = Arc::default();
        let (events, r) = (inner.events(), routes.clone());
        std::thread::Builder::new()
            .name("xenstore-mux".into())
            .spawn(move || {
                for ev in events.iter() {
                    let to = r
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(&ev.token)
                        .cloned();
                    // A token nobody holds any more: its watch is being removed.
                    let (Some(to), Some((_, token))) = (to, ev.token.split_once('/')) else {
                        continue;
                    };
                    let _ = to.send(WatchEvent {
                        token: token.to_string(),
                        path: ev.path,
                    });
                }
            })
            .map_err(|e| XsError::Io(format!("xenstore event thread: {e}")))?;
        Ok(Arc::new(XsMux {
            inner,
            routes,
            views: AtomicU64::new(1),
        }))
    }

    /// A user's view: the shared connection, with the events of the tokens it watches.
    pub fn view(self: &Arc<Self>) -> MuxView {
        let (tx, rx) = unbounded();
        MuxView {
            id: self.views.fetch_add(1, Ordering::Relaxed),
            mux: self.clone(),
            tx,
            rx,
            tokens: Mutex::new(Vec::new()),
        }
    }
}

/// One user's side of an [`XsMux`]; dropping it stops its routes (its watches are its
/// user's to remove, as on a connection of its own... which would have removed them by
/// closing: a view does not, so users unwatch before they go, as devices do).
pub struct MuxView {
    id: u64,
    mux: Arc<XsMux>,
    tx: Sender<WatchEvent>,
    rx: Receiver<WatchEvent>,
    tokens: Mutex<Vec<String>>,
}

impl Drop for MuxView {
    fn drop(&mut self) {
        let mut routes = self.mux.routes.lock().unwrap_or_else(|p| p.into_inner());
        for t in self
            .tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            routes.remove(&t);
        }
    }
}

impl Xenstore for MuxView {
    fn read(&self, tx: TxId, path: &str) -> Result<Vec<u8>, XsError> {
        self.mux.inner.read(tx, path)
    }
    fn write(&self, tx: TxId, path: &str, value: &[u8]) -> Result<(), XsError> {
        self.mux.inner.write(tx, path, value)
    }
    fn mkdir(&self, tx: TxId, path: &str) -> Result<(), XsError> {
        self.mux.inner.mkdir(tx, path)
    }
    fn rm(&self, tx: TxId, path: &str) -> Result<(), XsError> {
        self.mux.inner.rm(tx, path)
    }
    fn directory(&self, tx: TxId, path: &str) -> Result<Vec<String>, XsError> {
        self.mux.inner.directory(tx, path)
    }
    fn get_perms(&self, tx: TxId, path: &str) -> Result<Vec<Perm>, XsError> {
        self.mux.inner.get_perms(tx, path)
    }
    fn set_perms(&self, tx: TxId, path: &str, perms: &[Perm]) -> Result<(), XsError> {
        self.mux.inner.set_perms(tx, path, perms)
    }
    /// The route goes in before the watch: xenstored fires a new watch once at once.
    fn watch(&self, path: &str, token: &str) -> Result<(), XsError> {
        let full = format!("{}/{token}", self.id);
        self.mux
            .routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(full.clone(), self.tx.clone());
        let mut mine = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        if !mine.contains(&full) {
            mine.push(full.clone());
        }
        drop(mine);
        self.mux.inner.watch(path, &full)
    }
    /// The route stays until the view goes: the same token may watch other paths.
    fn unwatch(&self, path: &str, token: &str) -> Result<(), XsError> {
        self.mux
            .inner
            .unwatch(path, &format!("{}/{token}", self.id))
    }
    fn transaction_start(&self) -> Result<TxId, XsError> {
        self.mux.inner.transaction_start()
    }
    fn transaction_end(&self, tx: TxId, commit: bool) -> Result<(), XsError> {
        self.mux.inner.transaction_end(tx, commit)
    }
    fn get_domain_path(&self, domid: u32) -> Result<String, XsError> {
        self.mux.inner.get_domain_path(domid)
    }
    fn events(&self) -> Receiver<WatchEvent> {
        self.rx.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xen::sim::xenstored::SimXenstored;
    use crate::xen::xenstore::NO_TX;
    use std::time::Duration;

    fn next(v: &MuxView) -> WatchEvent {
        v.events()
            .recv_timeout(Duration::from_secs(5))
            .expect("a watch event")
    }

    /// Each view sees the events of its own watches only, under the tokens it chose, even
    /// when two views chose the same token; requests of all views go through one
    /// connection.
    #[test]
    fn views_see_their_own_events_under_their_own_tokens() {
        let xsd = SimXenstored::new();
        let mux = XsMux::new(Box::new(xsd.connect(0).unwrap())).unwrap();
        let (a, b) = (mux.view(), mux.view());
        a.write(NO_TX, "/t/a", b"1").unwrap();
        b.write(NO_TX, "/t/b", b"1").unwrap();
        a.watch("/t/a", "tok").unwrap();
        b.watch("/t/b", "tok").unwrap();
        // The first firing of each watch, then one per change.
        assert_eq!(
            (next(&a).path, next(&b).path),
            ("/t/a".into(), "/t/b".into())
        );
        b.write(NO_TX, "/t/a", b"2").unwrap();
        let e = next(&a);
        assert_eq!((e.path.as_str(), e.token.as_str()), ("/t/a", "tok"));
        assert!(b.events().recv_timeout(Duration::from_millis(200)).is_err());
        assert_eq!(a.read(NO_TX, "/t/a").unwrap(), b"2");
        // A view that goes takes its routes; the other goes on.
        a.unwatch("/t/a", "tok").unwrap();
        drop(a);
        a_write_then(&b);
    }

    fn a_write_then(b: &MuxView) {
        b.write(NO_TX, "/t/b", b"3").unwrap();
        assert_eq!(next(b).path, "/t/b");
    }
}
