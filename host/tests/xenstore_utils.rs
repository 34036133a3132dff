//! Xen's own C clients (package xenstore-utils) against `xen-disk-host sim xenstored`: they
//! print what they print against a real xenstored. Fails, not skips, when the tools are
//! missing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

struct Daemon {
    child: Child,
    dir: PathBuf,
}

impl Daemon {
    fn start() -> Daemon {
        let dir = std::env::temp_dir().join(format!(
            "xs-utils-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("socket");
        let child = Command::new(env!("CARGO_BIN_EXE_xen-disk-host"))
            .args(["sim", "xenstored", "--socket"])
            .arg(&socket)
            .spawn()
            .unwrap();
        let started = Instant::now();
        while !socket.exists() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "sim xenstored did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon { child, dir }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("socket")
    }

    fn tool(&self, name: &str, args: &[&str]) -> Output {
        let path = Path::new("/usr/bin").join(name);
        assert!(
            path.exists(),
            "{} missing: install xenstore-utils",
            path.display()
        );
        Command::new(path)
            .args(args)
            .env("XENSTORED_PATH", self.socket())
            .output()
            .unwrap()
    }

    fn ok(&self, name: &str, args: &[&str]) -> String {
        let o = self.tool(name, args);
        assert!(
            o.status.success(),
            "{name} {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn write_read_list_exists_rm() {
    let d = Daemon::start();
    assert_eq!(d.ok("xenstore-write", &["/a/b", "c", "/a/e", "f g"]), "");
    assert_eq!(d.ok("xenstore-read", &["/a/b"]), "c\n");
    assert_eq!(d.ok("xenstore-read", &["/a/e"]), "f g\n");
    assert_eq!(d.ok("xenstore-list", &["/a"]), "b\ne\n");
    assert!(d.tool("xenstore-exists", &["/a/b"]).status.success());
    assert!(!d.tool("xenstore-exists", &["/a/nope"]).status.success());
    assert_eq!(d.ok("xenstore-rm", &["/a/b"]), "");
    let o = d.tool("xenstore-read", &["/a/b"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("couldn't read path /a/b"));
}

#[test]
fn ls_shows_the_tree_and_permissions() {
    let d = Daemon::start();
    d.ok("xenstore-write", &["/t/x", "1", "/t/y/z", "2"]);
    assert_eq!(
        d.ok("xenstore-ls", &["/t"]),
        "x = \"1\"\ny = \"\"\n z = \"2\"\n"
    );
    let root = d.ok("xenstore-ls", &["/"]);
    assert!(
        root.contains("local = \"\"\n domain = \"\"\n  0 = \"\"\n"),
        "{root}"
    );
    assert!(root.contains("   name = \"Domain-0\"\n"), "{root}");
    d.ok("xenstore-chmod", &["/t/x", "n0", "r5"]);
    let perms = d.ok("xenstore-ls", &["-p", "/t"]);
    let line = perms.lines().find(|l| l.starts_with("x = ")).unwrap();
    assert!(line.ends_with("(n0,r5)"), "{perms}");
}

#[test]
fn watch_prints_the_path_at_once_and_on_changes() {
    let d = Daemon::start();
    let mut watch = Command::new("/usr/bin/xenstore-watch")
        .args(["-n", "3", "/w"])
        .env("XENSTORED_PATH", d.socket())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("xenstore-watch (install xenstore-utils)");
    std::thread::sleep(Duration::from_millis(300));
    d.ok("xenstore-write", &["/w", "1"]);
    d.ok("xenstore-write", &["/w/child", "2"]);
    let started = Instant::now();
    while watch.try_wait().unwrap().is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "xenstore-watch saw fewer than 3 events"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut out = String::new();
    std::io::Read::read_to_string(watch.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert_eq!(out, "/w\n/w\n/w/child\n");
}
