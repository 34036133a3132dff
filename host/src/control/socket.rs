//! The control socket's listener and client. A Unix socket, mode 0600; a peer is served only
//! when it runs as root or as this process's user (checked with SO_PEERCRED, because a socket
//! file's mode is not enforced everywhere, e.g. on some filesystems and in containers).

use super::Registry;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Where `serve` listens unless told otherwise.
pub const DEFAULT_SERVE: &str = "/run/xen-disk/serve.sock";

/// The default socket of a `connect` process (one per process).
pub fn default_connect() -> PathBuf {
    PathBuf::from(format!("/run/xen-disk/connect-{}.sock", std::process::id()))
}

/// Removes the socket file when the listener goes.
pub struct Listening {
    path: PathBuf,
}

impl Drop for Listening {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Listens at `path` and answers requests on a thread until the process ends.
pub fn listen(path: &Path, registry: Arc<Registry>) -> Result<Listening, String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    if UnixStream::connect(path).is_ok() {
        return Err(format!(
            "{}: another xen-disk-host is listening there",
            path.display()
        ));
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    std::thread::Builder::new()
        .name("xen-disk-control".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let r = registry.clone();
                // A request may open a plugin (swap): answer each on its own thread so a slow
                // one does not hold up `stats`.
                let _ = std::thread::Builder::new()
                    .name("xen-disk-ctl".into())
                    .spawn(move || answer(conn, &r));
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(Listening {
        path: path.to_path_buf(),
    })
}

fn peer_allowed(conn: &UnixStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a ucred of `len` bytes at the pointer we pass.
    let rc = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    rc == 0 && (cred.uid == 0 || cred.uid == me)
}

fn answer(conn: UnixStream, registry: &Registry) {
    if !peer_allowed(&conn) {
        let mut c = &conn;
        let _ = c.write_all(b"error: permission denied\n");
        return;
    }
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut line = String::new();
    // One bounded line: a request is a few words.
    if BufReader::new((&conn).take(4096))
        .read_line(&mut line)
        .is_err()
    {
        return;
    }
    let mut text = registry.handle(&line);
    if !text.ends_with('\n') {
        text.push('\n');
    }
    let mut c = &conn;
    let _ = c.write_all(text.as_bytes());
}

/// Sends one request to the socket at `path`; the answer's text.
pub fn request(path: &Path, line: &str) -> Result<String, String> {
    let mut conn = UnixStream::connect(path).map_err(|e| {
        format!(
            "{}: {e} (is `xen-disk-host serve` or `connect` running? --socket names another)",
            path.display()
        )
    })?;
    conn.set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(|e| e.to_string())?;
    conn.write_all(format!("{}\n", line.trim()).as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = String::new();
    conn.read_to_string(&mut out)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(out)
}
