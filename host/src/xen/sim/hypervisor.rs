//! The simulated hypervisor's rendezvous: how a backend finds a guest's memory, grant table
//! and event channel ports, in the same process or in another one.
//!
//! The guest side is a [`SimDomain`]. A backend gets a [`SimBackend`] from it directly
//! ([`SimDomain::backend`]) or, across processes, by connecting to the socket the guest
//! serves ([`SimDomain::serve`], [`SimBackend::connect`]): the socket hands over the memfd,
//! the grant table and each port's eventfds with SCM_RIGHTS, so both processes share the
//! very same pages and doorbells. [`SimBackend`] implements the platform traits the real
//! backend uses, [`GrantMapper`] and [`EventChannels`].

use super::evtchn::{PortFds, SimChannel};
use super::grant::{GuestGrants, SimGrantMapper};
use super::memory::SharedPages;
use crate::xen::evtchn::{EventChannel, EventChannels, EvtchnError};
use crate::xen::grant::{GrantError, GrantMapper, GrantMapping};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

/// A simulated guest: its memory, its grant table, its event channel ports.
pub struct SimDomain {
    /// Domain id.
    pub domid: u32,
    /// Its memory.
    pub memory: Arc<SharedPages>,
    /// Its grant table.
    pub grants: GuestGrants,
    ports: Mutex<HashMap<u32, Arc<PortFds>>>,
    next_port: AtomicU32,
}

impl SimDomain {
    /// A guest with `memory_pages` pages and a grant table of `grant_pages` pages.
    pub fn new(domid: u32, memory_pages: usize, grant_pages: usize) -> io::Result<Arc<SimDomain>> {
        Ok(Arc::new(SimDomain {
            domid,
            memory: Arc::new(SharedPages::new("xen-disk-sim-guest", memory_pages)?),
            grants: GuestGrants::new(grant_pages)?,
            ports: Mutex::default(),
            next_port: AtomicU32::new(1),
        }))
    }

    /// Allocates an unbound port for a backend to bind to; returns the guest's end.
    pub fn alloc_unbound(&self) -> io::Result<SimChannel> {
        let port = self.next_port.fetch_add(1, Ordering::Relaxed);
        let fds = Arc::new(PortFds::new()?);
        self.ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(port, fds.clone());
        Ok(SimChannel::guest(port, fds))
    }

    /// A backend's view of this guest, in the same process.
    pub fn backend(self: &Arc<Self>, my_domid: u32) -> SimBackend {
        SimBackend {
            grants: SimGrantMapper {
                my_domid,
                guest_domid: self.domid,
                memory: self.memory.clone(),
                table: self.grants.table().clone(),
            },
            ports: Ports::Local(self.clone()),
        }
    }

    fn port(&self, port: u32) -> Option<Arc<PortFds>> {
        self.ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&port)
            .cloned()
    }

    /// Serves backends in other processes on a unix socket at `path`.
    pub fn serve(self: &Arc<Self>, path: &Path) -> io::Result<()> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("sim-hypervisor".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    let me = me.clone();
                    std::thread::spawn(move || me.answer(stream));
                }
            })?;
        Ok(())
    }

    /// One backend connection: `D` → domid + memory and table fds; `P<port>` → the port's fds.
    fn answer(&self, s: UnixStream) {
        let mut buf = [0u8; 5];
        loop {
            let Ok((n, _)) = recv_fds(&s, &mut buf) else {
                return;
            };
            let sent = match (n, buf[0]) {
                (1, b'D') => send_fds(
                    &s,
                    &self.domid.to_le_bytes(),
                    &[
                        self.memory.fd().as_raw_fd(),
                        self.grants.table().fd().as_raw_fd(),
                    ],
                ),
                (5, b'P') => {
                    let port = u32::from_le_bytes(buf[1..5].try_into().expect("4 bytes"));
                    match self.port(port) {
                        Some(p) => send_fds(
                            &s,
                            b"Y",
                            &[p.to_backend.as_raw_fd(), p.to_guest.as_raw_fd()],
                        ),
                        None => send_fds(&s, b"N", &[]),
                    }
                }
                _ => return,
            };
            if sent.is_err() {
                return;
            }
        }
    }
}

enum Ports {
    Local(Arc<SimDomain>),
    Remote(Mutex<UnixStream>),
}

/// A backend's handle on one simulated guest: maps its grants, binds its ports.
pub struct SimBackend {
    grants: SimGrantMapper,
    ports: Ports,
}

impl SimBackend {
    /// Connects to a guest served by [`SimDomain::serve`] in another process.
    pub fn connect(path: &Path, my_domid: u32) -> io::Result<SimBackend> {
        let s = UnixStream::connect(path)?;
        send_fds(&s, b"D", &[])?;
        let mut buf = [0u8; 4];
        let (n, mut fds) = recv_fds(&s, &mut buf)?;
        if n != 4 || fds.len() != 2 {
            return Err(io::Error::other(
                "the simulated hypervisor sent a malformed domain reply",
            ));
        }
        let table = Arc::new(SharedPages::from_fd(fds.pop().expect("two fds"))?);
        let memory = Arc::new(SharedPages::from_fd(fds.pop().expect("two fds"))?);
        let guest_domid = u32::from_le_bytes(buf);
        Ok(SimBackend {
            grants: SimGrantMapper {
                my_domid,
                guest_domid,
                memory,
                table,
            },
            ports: Ports::Remote(Mutex::new(s)),
        })
    }

    /// The guest's domain id.
    pub fn guest_domid(&self) -> u32 {
        self.grants.guest_domid
    }
}

impl GrantMapper for SimBackend {
    fn map(&self, domid: u32, refs: &[u32], writable: bool) -> Result<GrantMapping, GrantError> {
        self.grants.map(domid, refs, writable)
    }
}

impl EventChannels for SimBackend {
    fn bind_interdomain(
        &self,
        remote_domid: u32,
        remote_port: u32,
    ) -> Result<Box<dyn EventChannel>, EvtchnError> {
        if remote_domid != self.grants.guest_domid {
            return Err(EvtchnError(format!("no simulated domain {remote_domid}")));
        }
        let fds = match &self.ports {
            Ports::Local(d) => d.port(remote_port),
            Ports::Remote(s) => {
                let s = s.lock().unwrap_or_else(|e| e.into_inner());
                let mut req = [b'P', 0, 0, 0, 0];
                req[1..].copy_from_slice(&remote_port.to_le_bytes());
                send_fds(&s, &req, &[]).map_err(|e| EvtchnError(e.to_string()))?;
                let mut ans = [0u8; 1];
                let (_, mut fds) =
                    recv_fds(&s, &mut ans).map_err(|e| EvtchnError(e.to_string()))?;
                match (ans[0], fds.len()) {
                    (b'Y', 2) => {
                        let to_guest = fds.pop().expect("two fds");
                        let to_backend = fds.pop().expect("two fds");
                        Some(Arc::new(PortFds {
                            to_backend,
                            to_guest,
                        }))
                    }
                    _ => None,
                }
            }
        };
        let fds = fds.ok_or_else(|| {
            EvtchnError(format!("domain {remote_domid} has no port {remote_port}"))
        })?;
        Ok(Box::new(SimChannel::backend(remote_port, fds)))
    }
}

/// Sends `data` with `fds` attached (SCM_RIGHTS).
fn send_fds(s: &UnixStream, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut _,
        iov_len: data.len(),
    };
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    // SAFETY: msghdr is plain data; zeroed is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer holds one header with room for the fds (CMSG_SPACE).
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(c).cast::<RawFd>(),
                fds.len(),
            );
        }
    }
    // SAFETY: msg points at live buffers for the call.
    if unsafe { libc::sendmsg(s.as_raw_fd(), &msg, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives into `buf` and takes ownership of up to 4 attached descriptors.
fn recv_fds(s: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: a pure size computation.
    let space = unsafe { libc::CMSG_SPACE((4 * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    // SAFETY: msghdr is plain data; zeroed is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg points at live buffers for the call.
    let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n <= 0 {
        return Err(if n == 0 {
            io::Error::from(io::ErrorKind::UnexpectedEof)
        } else {
            io::Error::last_os_error()
        });
    }
    let mut fds = Vec::new();
    // SAFETY: walking the control headers the kernel filled in, within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n as usize, fds))
}
