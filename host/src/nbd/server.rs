//! Listening for NBD clients on a Unix socket or a TCP port, one thread per client, at most
//! [`MAX_CLIENTS`] at once (another is closed at once). Dropping the [`Server`] stops
//! listening and disconnects the clients still connected. The handshake must finish within
//! [`HANDSHAKE_DEADLINE`] per read, so an idle half-open client does not hold a place.

use super::{handshake, transmit, Export};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Clients served at once.
pub const MAX_CLIENTS: usize = 64;

/// How long one read of the handshake may wait.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(30);

/// How long a reply may wait for the client to make room for it: a client that sends
/// requests but never reads the replies is disconnected after this, which frees its
/// workers and its place.
pub const REPLY_DEADLINE: Duration = Duration::from_secs(60);

/// The send buffer asked for on Unix connections: room for a few 1 MiB replies.
pub const SEND_BUFFER: usize = 4 << 20;

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A Unix socket at this path (created mode 0600; an existing socket file is replaced).
    Unix(PathBuf),
    /// A TCP address, `HOST:PORT`.
    Tcp(String),
}

impl Listen {
    /// Parses `unix:PATH` or `tcp:HOST:PORT`.
    pub fn parse(text: &str) -> Result<Listen, String> {
        if let Some(p) = text.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(format!("`{text}`: unix: needs a path"));
            }
            Ok(Listen::Unix(PathBuf::from(p)))
        } else if let Some(a) = text.strip_prefix("tcp:") {
            if !a.contains(':') {
                return Err(format!("`{text}`: tcp: needs HOST:PORT"));
            }
            Ok(Listen::Tcp(a.to_string()))
        } else {
            Err(format!("`{text}`: expected unix:PATH or tcp:HOST:PORT"))
        }
    }

    /// An NBD URI for clients (`nbd+unix:///?socket=PATH`, `nbd://HOST:PORT`).
    pub fn uri(&self) -> String {
        match self {
            Listen::Unix(p) => format!("nbd+unix:///?socket={}", p.display()),
            Listen::Tcp(a) => format!("nbd://{a}"),
        }
    }
}

/// A client's connection.
pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    /// A second handle on the same connection (the reply side).
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }
    /// Closes both directions.
    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }
    /// Sets the deadline of each write.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tcp(s) => s.set_write_timeout(t),
        }
    }
    /// Sets (or, with `None`, lifts) the read deadline.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write_vectored(bufs),
            Stream::Tcp(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

/// A listening server; dropping it stops accepting (clients being served finish) and
/// removes a Unix socket file.
pub struct Server {
    stop: Arc<AtomicBool>,
    clients: Clients,
    path: Option<PathBuf>,
    addr: String,
}

impl Server {
    /// The address clients use (the bound TCP address, with the port if 0 was asked).
    pub fn uri(&self) -> String {
        match &self.path {
            Some(p) => Listen::Unix(p.clone()).uri(),
            None => Listen::Tcp(self.addr.clone()).uri(),
        }
    }
}

/// The connections being served, by number, so that they can be closed.
type Clients = Arc<Mutex<HashMap<u64, Stream>>>;

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for (_, c) in self
            .clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
        {
            c.shutdown();
        }
        // Wake the accept loop so it sees the flag.
        match &self.path {
            Some(p) => {
                let _ = UnixStream::connect(p);
                let _ = std::fs::remove_file(p);
            }
            None => {
                let _ = TcpStream::connect(&self.addr);
            }
        }
    }
}

/// Starts serving `export` at `listen` on a thread of its own.
pub fn serve(listen: &Listen, export: Arc<Export>) -> Result<Server, String> {
    Ok(bind(listen)?.start(export))
}

/// A bound listener that accepts no client yet: a live backup binds before it freezes the
/// disk (so a bad address changes nothing) and starts once the export is frozen.
pub struct Bound(Listener);

/// Binds `listen` (the only step that can fail).
pub fn bind(listen: &Listen) -> Result<Bound, String> {
    let listener = match listen {
        Listen::Unix(path) => {
            if UnixStream::connect(path).is_ok() {
                return Err(format!("{}: a server is listening there", path.display()));
            }
            let _ = std::fs::remove_file(path);
            let l = UnixListener::bind(path).map_err(|e| format!("{}: {e}", path.display()))?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| format!("{}: {e}", path.display()))?;
            Listener::Unix(l, path.clone())
        }
        Listen::Tcp(addr) => {
            Listener::Tcp(TcpListener::bind(addr).map_err(|e| format!("{addr}: {e}"))?)
        }
    };
    Ok(Bound(listener))
}

impl Bound {
    /// Starts accepting clients of `export`.
    pub fn start(self, export: Arc<Export>) -> Server {
        let listener = self.0;
        let stop = Arc::new(AtomicBool::new(false));
        let (path, addr) = match &listener {
            Listener::Unix(_, p) => (Some(p.clone()), String::new()),
            Listener::Tcp(l) => (
                None,
                l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            ),
        };
        let (flag, clients) = (stop.clone(), Clients::default());
        let list = clients.clone();
        // Without a thread no client is served; the server still closes cleanly.
        if let Err(e) = std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_loop(listener, export, flag, list))
        {
            tracing::error!("nbd: cannot start the listener thread: {e}");
        }
        Server {
            stop,
            clients,
            path,
            addr,
        }
    }
}

/// Asks for a [`SEND_BUFFER`] socket buffer on a Unix connection (the kernel caps it at
/// `net.core.wmem_max`), so a large read's reply goes into the socket in one call and the
/// thread goes on serving while the client takes it. Not on TCP, whose own tuning a fixed
/// size would switch off.
fn widen_send_buffer(s: &UnixStream) {
    use std::os::fd::AsRawFd;
    let size = SEND_BUFFER as libc::c_int;
    // SAFETY: the descriptor is the open socket `s` holds; the option's value is a c_int
    // that lives through the call, and its length is given.
    let _ = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

fn accept_loop(listener: Listener, export: Arc<Export>, stop: Arc<AtomicBool>, clients: Clients) {
    let active = Arc::new(AtomicUsize::new(0));
    for number in 0u64.. {
        let conn = match &listener {
            Listener::Unix(l, _) => l.accept().map(|(s, _)| {
                widen_send_buffer(&s);
                Stream::Unix(s)
            }),
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }),
        };
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(conn) = conn else {
            // Out of descriptors, most likely: wait for some to close.
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
            active.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!("nbd: more than {MAX_CLIENTS} clients; closing a new one");
            conn.shutdown();
            continue;
        }
        if let Ok(c) = conn.try_clone() {
            clients
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(number, c);
        }
        // Checked again now that the connection is listed: a Drop in between closes it.
        if stop.load(Ordering::SeqCst) {
            conn.shutdown();
            return;
        }
        let (export, active, clients) = (export.clone(), active.clone(), clients.clone());
        let spawned = std::thread::Builder::new()
            .name("nbd-client".into())
            .spawn(move || {
                client(conn, &export);
                clients
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&number);
                active.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            tracing::warn!("nbd: cannot start a client thread");
        }
    }
}

/// Serves one client from handshake to disconnect.
fn client(mut conn: Stream, export: &Export) {
    let _ = conn.set_read_timeout(Some(HANDSHAKE_DEADLINE));
    let _ = conn.set_write_timeout(Some(REPLY_DEADLINE));
    let session = match handshake::negotiate(&mut conn, export) {
        Ok(s) => s,
        Err(handshake::Ended::Quit) => return conn.shutdown(),
        Err(handshake::Ended::Broken(why)) => {
            tracing::warn!("nbd: handshake refused: {why}; disconnected");
            return conn.shutdown();
        }
        Err(handshake::Ended::Io(e)) => {
            tracing::debug!("nbd: handshake: {e}");
            return conn.shutdown();
        }
    };
    let _ = conn.set_read_timeout(None);
    if let Err(why) = transmit::run(conn, export, session) {
        tracing::warn!("nbd: {why}; disconnected");
    }
}
