//! `serve --config disks.toml --sim`: the daemon serves the configured disks to simulated
//! guests, picks up devices the toolstack creates under `backend/vbd3` (plugin from
//! `params`), refuses a bad one with an `error` node while the others keep serving, and stops
//! cleanly on SIGTERM.

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};
use xen_disk_host::xen::xenstore::client::XsClient;
use xen_disk_host::xen::xenstore::{transaction, Access, Perm, Xenstore, NO_TX};

fn perm(domid: u32, access: Access) -> Perm {
    Perm { domid, access }
}

struct Daemon {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A failed test must not leave the daemon running.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    fn start(args: &[&str]) -> Daemon {
        build_all();
        let mut child = Command::new(target_dir().join("xen-disk-host"))
            .args(args)
            .env("XEN_DISK_PLUGIN_PATH", target_dir())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run xen-disk-host serve");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Daemon {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line containing every needle; returns it.
    fn expect(&mut self, needles: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(l) = self
                .seen
                .iter()
                .find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return l.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(_) => panic!("no line with {needles:?}; saw:\n{}", self.seen.join("\n")),
            }
        }
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success());
    }

    fn terminate(&mut self) -> Vec<String> {
        self.signal("-TERM");
        let status = self.child.wait().unwrap();
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(l);
        }
        assert!(
            status.success(),
            "exit {status:?}:\n{}",
            self.seen.join("\n")
        );
        self.seen.clone()
    }
}

#[test]
fn serve_runs_configured_and_toolstack_disks_until_sigterm() {
    let t = TempDir::new("serve");
    let (a, b, c) = (t.join("a.img"), t.join("b.img"), t.join("c.img"));
    for (p, len) in [(&a, 64 << 20), (&b, 32 << 20), (&c, 16 << 20)] {
        std::fs::File::create(p).unwrap().set_len(len).unwrap();
    }
    let config = t.join("disks.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[[disk]]
domain = "alpha"
plugin = "mmap"
[disk.plugin-config]
path = "{}"

[[disk]]
domain = "alpha"
plugin = "file"
readonly = true
sector-size = 4096
[disk.plugin-config]
path = "{}"

[[disk]]
domain = "7"
plugin = "file"
[disk.plugin-config]
path = "{}"
"#,
            a.display(),
            b.display(),
            b.display()
        ),
    )
    .unwrap();
    let socket = t.join("xs.sock");
    let control = t.join("control.sock");
    let mut d = Daemon::start(&[
        "serve",
        "--sim",
        "--config",
        config.to_str().unwrap(),
        "--xenstore-socket",
        socket.to_str().unwrap(),
        "--control",
        control.to_str().unwrap(),
    ]);
    d.expect(&["disk 1: mmap attached to domain 1 as xvdb"]);
    d.expect(&["disk 2: file attached to domain 1 as xvdc"]);
    d.expect(&["disk 3: file attached to domain 7 as xvdb"]);
    d.expect(&[
        "guest 1 connected",
        "/51728: 67108864 bytes, 512-byte sectors",
    ]);
    d.expect(&[
        "guest 1 connected",
        "/51744: 33554432 bytes, 4096-byte sectors, read-only",
    ]);
    d.expect(&[
        "guest 7 connected",
        "/51728: 33554432 bytes, 512-byte sectors",
    ]);
    let ctl = |args: &[&str]| {
        let mut a = vec!["ctl", "--socket", control.to_str().unwrap()];
        a.extend_from_slice(args);
        host(&a)
    };

    // ctl list: every device, connected, with its stack.
    let o = ctl(&["list"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let list = stdout(&o);
    for want in [
        "1/xvdb domain=1 guest=alpha vbd=xvdb state=Connected size=67108864 stack=mmap",
        "1/xvdc domain=1 guest=alpha vbd=xvdc state=Connected size=33554432 stack=file",
        "7/xvdb domain=7 guest=sim-guest-7 vbd=xvdb state=Connected size=33554432 stack=file",
    ] {
        assert!(list.contains(want), "{want} missing from:\n{list}");
    }
    // ctl stats: exactly what the simulated guest did (one 1 MiB read on connecting).
    let o = ctl(&["stats", "7/xvdb", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let json = stdout(&o);
    for want in [
        "\"device\":\"7/xvdb\"",
        "\"reads\":1,",
        "\"writes\":0,",
        "\"read_bytes\":1048576,",
        "\"write_bytes\":0,",
        "\"errors\":0,",
        "\"in_flight\":0,",
    ] {
        assert!(
            json.starts_with('{') && json.contains(want),
            "{want}: {json}"
        );
    }
    assert!(json.contains("\"queues\":[{"), "{json}");
    // ctl --watch: a new snapshot every second until interrupted.
    let mut watch = std::process::Command::new(target_dir().join("xen-disk-host"))
        .args(["ctl", "--socket", control.to_str().unwrap(), "--watch"])
        .args(["stats", "7/xvdb", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2500));
    watch.kill().unwrap();
    let watched = watch.wait_with_output().unwrap();
    let frames = String::from_utf8_lossy(&watched.stdout)
        .lines()
        .filter(|l| l.starts_with("{\"device\":\"7/xvdb\"") && l.contains("\"reads\":1,"))
        .count();
    assert!((2..=4).contains(&frames), "{frames} snapshots in 2.5 s");
    assert_bad_input(&ctl(&["--watch", "list"]), &["--watch"]);
    // ctl swap: mmap out, file in, over the same image; a plugin that cannot open changes
    // nothing.
    let o = ctl(&["swap", "1/xvdb", "file", &format!("path={}", a.display())]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("1/xvdb: now file; paused"),
        "{}",
        stdout(&o)
    );
    assert_bad_input(
        &ctl(&["swap", "1/xvdb", "qcow2", "path=/nonexistent/x.qcow2"]),
        &["/nonexistent/x.qcow2"],
    );
    assert!(stdout(&ctl(&["list"]))
        .contains("1/xvdb domain=1 guest=alpha vbd=xvdb state=Connected size=67108864 stack=file"));
    assert_bad_input(&ctl(&["stats", "xvdb"]), &["ambiguous"]);
    assert_bad_input(&ctl(&["stats", "9/xvdz"]), &["no device 9/xvdz"]);
    assert_bad_input(&ctl(&["frobnicate"]), &["unknown request"]);

    // The toolstack adds a disk to domain 1, as libxl would: both directories, one
    // transaction, the plugin in `params`.
    let xs = XsClient::connect_unix(&socket).unwrap();
    let toolstack_device = |devid: u32, params: &str| {
        let be = format!("/local/domain/0/backend/vbd3/1/{devid}");
        let fe = format!("/local/domain/1/device/vbd/{devid}");
        transaction(&xs, |tx| {
            // libxl's permissions, set on each directory before its keys (which inherit
            // them): each side owns its directory, the other side reads it.
            xs.mkdir(tx, &be)?;
            xs.set_perms(tx, &be, &[perm(0, Access::None), perm(1, Access::Read)])?;
            xs.mkdir(tx, &fe)?;
            xs.set_perms(tx, &fe, &[perm(1, Access::None), perm(0, Access::Read)])?;
            for (k, v) in [
                ("frontend", fe.as_str()),
                ("frontend-id", "1"),
                ("online", "1"),
                ("state", "1"),
                ("mode", "w"),
                ("params", params),
            ] {
                xs.write(tx, &format!("{be}/{k}"), v.as_bytes())?;
            }

            for (k, v) in [
                ("backend", be.as_str()),
                ("backend-id", "0"),
                ("state", "1"),
                ("virtual-device", &devid.to_string()),
            ] {
                xs.write(tx, &format!("{fe}/{k}"), v.as_bytes())?;
            }
            Ok(())
        })
        .unwrap();
        be
    };
    let be = toolstack_device(51760, &format!("file:{}", c.display()));
    d.expect(&[&format!("{be}: serving for domain 1")]);
    d.expect(&["guest 1 connected", "/51760: 16777216 bytes"]);
    assert_eq!(xs.read(NO_TX, &format!("{be}/state")).unwrap(), b"4");
    assert_eq!(
        xs.read(NO_TX, &format!("{be}/sectors")).unwrap(),
        (16u64 << 20 >> 9).to_string().as_bytes()
    );

    // A device whose plugin cannot open: an error node, Closing, and the rest serve on.
    let bad = toolstack_device(51776, "qcow2:/nonexistent/x.qcow2");
    d.expect(&[&bad, "plugin qcow2"]);
    d.expect(&["guest 1", "/51776: the backend closed it"]);
    let err = String::from_utf8(xs.read(NO_TX, &format!("{bad}/error")).unwrap()).unwrap();
    assert!(err.contains("/nonexistent/x.qcow2"), "{err}");
    assert_eq!(xs.read(NO_TX, &format!("{bad}/state")).unwrap(), b"5");
    let garbage = toolstack_device(51792, "");
    d.expect(&[&garbage, "params"]);
    assert_eq!(xs.read(NO_TX, &format!("{be}/state")).unwrap(), b"4");

    // SIGHUP with a changed disks.toml: disk 3 moves from file to mmap under the running guest.
    let text = std::fs::read_to_string(&config).unwrap();
    let i = text.rfind("plugin = \"file\"").unwrap();
    std::fs::write(
        &config,
        format!("{}plugin = \"mmap\"{}", &text[..i], &text[i + 15..]),
    )
    .unwrap();
    d.signal("-HUP");
    d.expect(&["reload: disk 3: now mmap"]);
    assert!(stdout(&ctl(&["list"])).contains(
        "7/xvdb domain=7 guest=sim-guest-7 vbd=xvdb state=Connected size=33554432 stack=mmap"
    ));
    std::fs::write(&config, "[[disk]]\nplugin = 3\n").unwrap();
    d.signal("-HUP");
    d.expect(&["reload:", "keeping the running configuration"]);
    // Two new disks, the first of which cannot open: disks are known by position, so the
    // second is not added either (and nothing is attached to the wrong index).
    let mmap_text = format!("{}plugin = \"mmap\"{}", &text[..i], &text[i + 15..]);
    std::fs::write(
        &config,
        format!(
            "{mmap_text}\n[[disk]]\ndomain = \"7\"\nplugin = \"nosuch\"\n\n[[disk]]\ndomain = \"7\"\nplugin = \"discard\"\n"
        ),
    )
    .unwrap();
    d.signal("-HUP");
    d.expect(&["reload: disk 4:", "nosuch"]);
    d.expect(&["reload: disk 5: not added"]);
    // Disk 3 left out: detached. Listed again: attached again, as the entry now says.
    let third = mmap_text.rfind("[[disk]]").unwrap();
    std::fs::write(&config, &mmap_text[..third]).unwrap();
    d.signal("-HUP");
    d.expect(&["reload: 7/xvdb no longer listed; detaching"]);
    d.expect(&["/local/domain/0/backend/vbd3/7/51728: removed"]);
    assert!(!stdout(&ctl(&["list"])).contains("7/xvdb"));
    std::fs::write(&config, &mmap_text).unwrap();
    d.signal("-HUP");
    d.expect(&["reload: disk 3 listed again"]);
    d.expect(&["disk 3: mmap attached to domain 7 as xvdb"]);
    d.expect(&["guest 7 connected", "/51728: 33554432 bytes"]);

    let lines = d.terminate();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("stopping: closing 4 device(s)")),
        "{lines:?}"
    );
    assert_eq!(
        lines.last().map(String::as_str),
        Some("stopped"),
        "{lines:?}"
    );
    let _ = std::fs::remove_file(&socket);
}

#[test]
fn a_read_only_disk_is_opened_read_only_so_an_image_the_host_cannot_write_is_served() {
    let t = TempDir::new("serve-ro");
    let img = t.join("ro.img");
    random_file(&img, 4 << 20, 12);
    let config = t.join("disks.toml");
    let disk = |readonly: bool| {
        format!(
            "[[disk]]\ndomain = \"alpha\"\nplugin = \"file\"\nreadonly = {readonly}\n\
             [disk.plugin-config]\npath = \"{}\"\n",
            img.display()
        )
    };
    let (socket, control) = (t.join("xs.sock"), t.join("control.sock"));
    let args = [
        "serve",
        "--sim",
        "--config",
        config.to_str().unwrap(),
        "--xenstore-socket",
        socket.to_str().unwrap(),
        "--control",
        control.to_str().unwrap(),
    ];
    let _locked = Immutable::new(&img);
    std::fs::write(&config, disk(true)).unwrap();
    let mut d = Daemon::start(&args);
    d.expect(&["disk 1: file attached to domain 1 as xvdb"]);
    d.expect(&["guest 1 connected", "4194304 bytes", "read-only"]);
    d.terminate();
    drop(d);
    let _ = std::fs::remove_file(&socket);
    // Served read-write, the same image is refused, naming the key.
    std::fs::write(&config, disk(false)).unwrap();
    assert_bad_input(
        &host(&args),
        &["ro.img", "(open it read-only with readonly=true)"],
    );
}

#[test]
fn serve_mistakes_are_one_line() {
    let t = TempDir::new("serve-bad");
    let config = t.join("disks.toml");
    std::fs::write(&config, "[[disk]]\ndomain = \"a\"\nplugin = \"nosuch\"\n").unwrap();
    assert_bad_input(
        &host(&["serve", "--sim", "--config", config.to_str().unwrap()]),
        &["disk 1", "nosuch"],
    );
    std::fs::write(&config, "[[disk]]\nplugin = \"mmap\"\n").unwrap();
    assert_bad_input(
        &host(&["serve", "--sim", "--config", config.to_str().unwrap()]),
        &["disks.toml", "domain"],
    );
    assert_bad_input(
        &host(&[
            "serve",
            "--sim",
            "--config",
            t.join("missing.toml").to_str().unwrap(),
        ]),
        &["missing.toml"],
    );
    if !std::path::Path::new("/dev/xen").exists() {
        assert_bad_input(&host(&["serve"]), &["not a Xen domain", "--sim"]);
    }
}
