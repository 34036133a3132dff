//! The metrics endpoint: a small HTTP/1.x server on one thread, answering `GET /metrics`
//! with the text exposition and closing each connection after its answer.
//!
//! Limits, so that a stuck or hostile client cannot wedge it: a request head of at most
//! [`MAX_HEAD`] bytes, read within [`DEADLINE`], and the answer written within the same
//! time; connections are served one at a time (a scrape takes microseconds).

use super::render;
use crate::backend::registry::Registry;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The longest request head (request line and headers) read.
pub const MAX_HEAD: usize = 8192;

/// How long a client has to send its request, and to take the answer.
pub const DEADLINE: Duration = Duration::from_secs(5);

/// Where `--metrics` listens: `PORT` (on 127.0.0.1), `ADDR:PORT` or `[V6]:PORT`.
pub fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    let t = text.trim();
    if let Ok(port) = t.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    t.to_socket_addrs()
        .map_err(|e| format!("`{t}`: not PORT or ADDR:PORT ({e})"))?
        .next()
        .ok_or_else(|| format!("`{t}`: no address"))
}

/// A running endpoint; the thread ends with the process.
pub struct Endpoint {
    /// Where it listens (the port chosen when 0 was asked).
    pub addr: SocketAddr,
}

/// Listens at `addr` and answers scrapes of `registry` on a thread of its own.
pub fn listen(addr: SocketAddr, registry: Arc<Registry>) -> Result<Endpoint, String> {
    let listener = TcpListener::bind(addr).map_err(|e| format!("{addr}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| format!("{addr}: {e}"))?;
    std::thread::Builder::new()
        .name("xen-disk-metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(c) => answer(c, &registry),
                    // Out of descriptors, say: wait a little rather than spin.
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        })
        .map_err(|e| format!("metrics thread: {e}"))?;
    Ok(Endpoint { addr })
}

/// Reads the request head, whole, within the deadline.
fn read_head(conn: &mut TcpStream) -> Result<String, &'static str> {
    let deadline = Instant::now() + DEADLINE;
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || conn.set_read_timeout(Some(left)).is_err() {
            return Err("408 Request Timeout");
        }
        match conn.read(&mut chunk) {
            Ok(0) => return Err(""),
            Ok(n) => head.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::Interrupted) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => return Err(""),
        }
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return String::from_utf8(head).map_err(|_| "400 Bad Request");
        }
        if head.len() > MAX_HEAD {
            return Err("431 Request Header Fields Too Large");
        }
    }
}

fn answer(mut conn: TcpStream, registry: &Registry) {
    let _ = conn.set_write_timeout(Some(DEADLINE));
    let (status, body, head_only) = match read_head(&mut conn) {
        Err("") => return,
        Err(status) => (status, format!("{status}\n"), false),
        Ok(head) => {
            let mut words = head.lines().next().unwrap_or("").split_whitespace();
            let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            let path = target.split('?').next().unwrap_or("");
            match (method, path) {
                ("GET" | "HEAD", "/metrics") => ("200 OK", render(registry), method == "HEAD"),
                ("GET" | "HEAD", _) => (
                    "404 Not Found",
                    "xen-disk-host: the metrics are at /metrics\n".into(),
                    method == "HEAD",
                ),
                _ => ("405 Method Not Allowed", "GET /metrics\n".into(), false),
            }
        }
    };
    let header = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = conn.write_all(header.as_bytes());
    if !head_only {
        let _ = conn.write_all(body.as_bytes());
    }
    let _ = conn.shutdown(std::net::Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(addr: SocketAddr, request: &[u8]) -> String {
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        c.write_all(request).unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn serves_metrics_and_refuses_the_rest() {
        let e = listen(
            parse_addr("127.0.0.1:0").unwrap(),
            Arc::new(Registry::default()),
        )
        .unwrap();
        let out = get(e.addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(
            out.contains("\r\n\r\n# HELP xen_disk_requests_total"),
            "{out}"
        );
        assert!(out.contains("\nxen_disk_devices 0\n"), "{out}");
        let out = get(e.addr, b"GET /other HTTP/1.0\r\n\r\n");
        assert!(out.starts_with("HTTP/1.1 404 "), "{out}");
        let out = get(e.addr, b"POST /metrics HTTP/1.1\r\n\r\n");
        assert!(out.starts_with("HTTP/1.1 405 "), "{out}");
        let mut long = b"GET /metrics HTTP/1.1\r\n".to_vec();
        long.resize(MAX_HEAD + 2048, b'a');
        let out = get(e.addr, &long);
        assert!(out.starts_with("HTTP/1.1 431 "), "{out}");
    }

    #[test]
    fn a_bare_port_means_loopback() {
        assert_eq!(
            parse_addr("9462").unwrap(),
            "127.0.0.1:9462".parse().unwrap()
        );
        assert_eq!(parse_addr("[::1]:80").unwrap(), "[::1]:80".parse().unwrap());
        assert!(parse_addr("nowhere").unwrap_err().contains("`nowhere`"));
    }
}
