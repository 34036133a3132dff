//! `serve --config disks.toml --sim`: the daemon serves the configured disks to simulated
//! guests, picks up devices the toolstack creates under `backend/vbd3` (plugin from
//! `params`), refuses a bad one with an `error` node while the others keep serving, and stops
//! cleanly on SIGTERM.

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};
use xen_disk_host::xen::xenstore::client::XsClient;
use xen_disk_host::xen::xenstore::{transaction, Access, Perm, Xenstore, NO_TX};

fn perm(domid: u32, access: Access) -> Perm {
    Perm { domid, access }
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
    // Every request timed, whatever this machine's clocksource (see queue::clock).
    let (mut d, _) = serve_sim_env(&t, &config, &[("XEN_DISK_LATENCY_SAMPLE", "1")]);
    d.expect("disk 1: mmap attached to domain 1 as xvdb");
    d.expect("disk 2: file attached to domain 1 as xvdc");
    d.expect("disk 3: file attached to domain 7 as xvdb");
    d.expect_all(&[
        "guest 1 connected",
        "/51728: 67108864 bytes, 512-byte sectors",
    ]);
    d.expect_all(&[
        "guest 1 connected",
        "/51744: 33554432 bytes, 4096-byte sectors, read-only",
    ]);
    d.expect_all(&[
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
        "\"lat_timed\":1,",
    ] {
        assert!(
            json.starts_with('{') && json.contains(want),
            "{want}: {json}"
        );
    }
    assert!(json.contains("\"queues\":[{"), "{json}");
    // ctl --watch: a new snapshot every second until interrupted. Three snapshots, timed as
    // they come (a fixed 2.5 s window saw one on a loaded machine, where starting `ctl` took
    // most of it): the first and the third some 2 s apart (a watch that did not wait
    // floods), and all of them, not just the first (a watch that stopped).
    let mut watch = std::process::Command::new(target_dir().join("xen-disk-host"))
        .args(["ctl", "--socket", control.to_str().unwrap(), "--watch"])
        .args(["stats", "7/xvdb", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (frame_tx, frames) = channel();
    let out = BufReader::new(watch.stdout.take().unwrap());
    std::thread::spawn(move || {
        for l in out.lines().map_while(Result::ok) {
            if frame_tx.send((Instant::now(), l)).is_err() {
                return;
            }
        }
    });
    let mut at = Vec::new();
    while at.len() < 3 {
        let (when, l) = frames
            .recv_timeout(Duration::from_secs(60))
            .expect("ctl --watch gave no new snapshot for 60 s");
        if l.starts_with("{\"device\":\"7/xvdb\"") {
            assert!(l.contains("\"reads\":1,"), "{l}");
            at.push(when);
        }
    }
    watch.kill().unwrap();
    watch.wait().unwrap();
    let apart = at[2] - at[0];
    // A snapshot is taken 1 s after the previous one was printed: two gaps are 2 s and more
    // (the scheduler can only lengthen them). This thread may see the first line late, so
    // the floor allows half a second; a watch that did not wait takes milliseconds.
    assert!(
        apart >= Duration::from_millis(1500),
        "three snapshots within {apart:?}"
    );
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
    d.expect(&format!("{be}: serving for domain 1"));
    d.expect_all(&["guest 1 connected", "/51760: 16777216 bytes"]);
    assert_eq!(xs.read(NO_TX, &format!("{be}/state")).unwrap(), b"4");
    assert_eq!(
        xs.read(NO_TX, &format!("{be}/sectors")).unwrap(),
        (16u64 << 20 >> 9).to_string().as_bytes()
    );

    // A device whose plugin cannot open: an error node, Closing, and the rest serve on.
    let bad = toolstack_device(51776, "qcow2:/nonexistent/x.qcow2");
    d.expect_all(&[&bad, "plugin qcow2"]);
    d.expect_all(&["guest 1", "/51776: the backend closed it"]);
    let err = String::from_utf8(xs.read(NO_TX, &format!("{bad}/error")).unwrap()).unwrap();
    assert!(err.contains("/nonexistent/x.qcow2"), "{err}");
    assert_eq!(xs.read(NO_TX, &format!("{bad}/state")).unwrap(), b"5");
    let garbage = toolstack_device(51792, "");
    d.expect_all(&[&garbage, "params"]);
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
    d.expect("reload: 7/xvdb: now mmap");
    assert!(stdout(&ctl(&["list"])).contains(
        "7/xvdb domain=7 guest=sim-guest-7 vbd=xvdb state=Connected size=33554432 stack=mmap"
    ));
    std::fs::write(&config, "[[disk]]\nplugin = 3\n").unwrap();
    d.signal("-HUP");
    d.expect_all(&["reload:", "keeping the running configuration"]);
    // Two new disks, the first of which cannot open: the second is added all the same (disks
    // are known by identity, not position).
    let mmap_text = format!("{}plugin = \"mmap\"{}", &text[..i], &text[i + 15..]);
    std::fs::write(
        &config,
        format!(
            "{mmap_text}\n[[disk]]\ndomain = \"7\"\nplugin = \"nosuch\"\n\n[[disk]]\ndomain = \"7\"\nplugin = \"discard\"\n"
        ),
    )
    .unwrap();
    d.signal("-HUP");
    d.expect_all(&["reload: disk 4", "nosuch"]);
    d.expect("reload: disk 5 added");
    d.expect("disk 5: discard attached to domain 7 as xvdc");
    d.expect_all(&["guest 7 connected", "/51744: "]);
    // Disks 3 and 5 left out: detached. Disk 3 listed again: attached again, as the entry
    // now says.
    let third = mmap_text.rfind("[[disk]]").unwrap();
    std::fs::write(&config, &mmap_text[..third]).unwrap();
    d.signal("-HUP");
    d.expect("reload: 7/xvdb no longer listed; detaching");
    d.expect("reload: 7/xvdc no longer listed; detaching");
    d.expect("/local/domain/0/backend/vbd3/7/51728: removed");
    d.expect("/local/domain/0/backend/vbd3/7/51744: removed");
    assert!(!stdout(&ctl(&["list"])).contains("7/xvdb"));
    std::fs::write(&config, &mmap_text).unwrap();
    d.signal("-HUP");
    d.expect("reload: disk 3 added");
    d.expect("disk 3: mmap attached to domain 7 as xvdb");
    d.expect_all(&["guest 7 connected", "/51728: 33554432 bytes"]);

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

/// Runs `ctl --socket CONTROL ARGS`; the test fails if it has not answered within `secs`.
fn ctl_within(control: &Path, secs: u64, args: &[&str]) -> Output {
    build_all();
    let mut child = Command::new(target_dir().join("xen-disk-host"))
        .arg("ctl")
        .arg("--socket")
        .arg(control)
        .args(args)
        .env("XEN_DISK_PLUGIN_PATH", target_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run xen-disk-host ctl");
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ctl {args:?} did not answer within {secs} s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

#[test]
fn ctl_swap_refuses_what_would_block_and_the_control_plane_keeps_answering() {
    let t = TempDir::new("serve-block");
    let (img, small) = (t.join("a.img"), t.join("small.img"));
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    std::fs::File::create(&small)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let config = t.join("disks.toml");
    std::fs::write(
        &config,
        format!(
            "[[disk]]\ndomain = \"1\"\nplugin = \"file\"\n[disk.plugin-config]\npath = \"{}\"\n",
            img.display()
        ),
    )
    .unwrap();
    let control = t.join("control.sock");
    let (mut d, _ctl) = serve_sim_env(&t, &config, &[("XEN_DISK_OPEN_TIMEOUT", "2")]);
    d.expect_all(&["guest 1 connected", "8388608 bytes"]);
    let path = format!("path={}", img.display());
    let listed = |o: &Output| {
        assert!(o.status.success(), "{}", stderr(o));
        assert!(stdout(o).contains("1/xvdb domain=1"), "{}", stdout(o));
        stdout(o)
    };

    // A FIFO named like a plugin: dlopen would block opening it, holding the dynamic
    // loader's lock, and the whole daemon with it. Refused before loading.
    let fifo_lib = t.join("libfifo.so");
    mkfifo(&fifo_lib);
    assert_bad_input(
        &ctl_within(
            &control,
            10,
            &["swap", "1/xvdb", fifo_lib.to_str().unwrap(), &path],
        ),
        &["libfifo.so", "a FIFO, not a regular file"],
    );
    assert!(listed(&ctl_within(&control, 5, &["list"])).contains("stack=file"));

    // A plugin whose open blocks (`file` opening a FIFO read-only waits for a writer): the
    // swap is answered at the daemon's 2 s limit; `list` and `stats` answer meanwhile.
    let fifo_img = t.join("image.fifo");
    mkfifo(&fifo_img);
    let started = Instant::now();
    let slow = {
        let control = control.clone();
        let fifo = format!("path={}", fifo_img.display());
        std::thread::spawn(move || {
            ctl_within(
                &control,
                20,
                &["swap", "1/xvdb", "file", "-c", &fifo, "-c", "readonly=true"],
            )
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..3 {
        listed(&ctl_within(&control, 3, &["list"]));
        let o = ctl_within(&control, 3, &["stats", "1/xvdb"]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    assert_bad_input(
        &slow.join().unwrap(),
        &["1/xvdb: not swapped: file", "not opened within 2 s"],
    );
    assert!(started.elapsed() < Duration::from_secs(10));

    // `-c key=value` as everywhere else (bare pairs still work), a typo's suggestion, a
    // refused shrink naming its flag, and a request over 64 KiB refused by `ctl` itself.
    let o = ctl_within(&control, 10, &["swap", "1/xvdb", "mmap", "-c", &path]);
    assert!(stdout(&o).contains("1/xvdb: now mmap"), "{}", stderr(&o));
    assert_bad_input(
        &ctl_within(&control, 10, &["swap", "1/xvdb", "fiel", "-c", &path]),
        &["no libfiel.so", "; did you mean file?"],
    );
    let shrink = format!("path={}", small.display());
    assert_bad_input(
        &ctl_within(&control, 10, &["swap", "1/xvdb", "file", &shrink]),
        &["smaller", "--allow-shrink"],
    );
    let long = format!("path=/{}", "x".repeat(70_000));
    assert_bad_input(
        &ctl_within(&control, 10, &["swap", "1/xvdb", "file", &long]),
        &["at most 65536"],
    );
    // A client that hangs up before its (slow) answer: the daemon, which keeps SIGPIPE's
    // default action for `| head`, must not die writing the answer.
    {
        use std::io::Write;
        let mut c = std::os::unix::net::UnixStream::connect(&control).unwrap();
        let req = format!(
            "swap 1/xvdb file -c path={} -c readonly=true\n",
            fifo_img.display()
        );
        c.write_all(req.as_bytes()).unwrap();
    }
    std::thread::sleep(Duration::from_millis(2500));
    assert!(listed(&ctl_within(&control, 5, &["list"])).contains("stack=mmap"));

    // SIGTERM stops the daemon although the blocked open's thread never ends.
    d.signal("-TERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = d.child.try_wait().unwrap() {
            assert!(status.success(), "{status:?}");
            break;
        }
        assert!(Instant::now() < deadline, "SIGTERM did not stop the daemon");
        std::thread::sleep(Duration::from_millis(50));
    }
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
    let mut d = Running::host(&args);
    d.expect("disk 1: file attached to domain 1 as xvdb");
    d.expect_all(&["guest 1 connected", "4194304 bytes", "read-only"]);
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

/// A `[[disk]]` entry serving `path` with the file plugin.
fn file_entry(domain: &str, path: &std::path::Path) -> String {
    format!(
        "[[disk]]\ndomain = \"{domain}\"\nplugin = \"file\"\n[disk.plugin-config]\npath = \"{}\"\n\n",
        path.display()
    )
}

/// `serve --sim` with `config`, its control socket in `t`; and a `ctl` runner for it.
fn serve_sim(t: &TempDir, config: &std::path::Path) -> (Running, impl Fn(&[&str]) -> String) {
    serve_sim_env(t, config, &[])
}

/// [`serve_sim`] with extra environment for the daemon.
fn serve_sim_env(
    t: &TempDir,
    config: &std::path::Path,
    env: &[(&str, &str)],
) -> (Running, impl Fn(&[&str]) -> String) {
    let control = t.join("control.sock");
    let d = Running::host_env(
        &[
            "serve",
            "--sim",
            "--config",
            config.to_str().unwrap(),
            "--xenstore-socket",
            t.join("xs.sock").to_str().unwrap(),
            "--control",
            control.to_str().unwrap(),
        ],
        env,
    );
    let ctl = move |args: &[&str]| {
        let mut a = vec!["ctl", "--socket", control.to_str().unwrap()];
        a.extend_from_slice(args);
        let o = host(&a);
        assert!(o.status.success(), "ctl {args:?}: {}", stderr(&o));
        stdout(&o)
    };
    (d, ctl)
}

#[test]
fn reload_matches_disks_by_domain_and_vbd_not_by_position() {
    let t = TempDir::new("serve-reload-identity");
    let img = |name: &str, len: u64| {
        let p = t.join(name);
        std::fs::File::create(&p).unwrap().set_len(len).unwrap();
        p
    };
    let (a64, b, c, a512) = (
        img("a64.img", 64 << 20),
        img("b.img", 16 << 20),
        img("c.img", 16 << 20),
        img("a512.img", 512 << 20),
    );
    let config = t.join("disks.toml");
    let entries = [
        file_entry("g1", &a64),
        file_entry("g2", &b),
        file_entry("g3", &c),
        file_entry("g1", &a512),
    ];
    std::fs::write(&config, entries.concat()).unwrap();
    let (mut d, ctl) = serve_sim(&t, &config);
    d.expect("disk 4: file attached to domain 1 as xvdc");
    d.expect_all(&["guest 1 connected", "/51744: 536870912 bytes"]);
    d.expect_all(&["guest 2 connected", "/51728: 16777216 bytes"]);

    // g2's entry deleted: g2's disk goes, g1's second disk stays.
    std::fs::write(
        &config,
        [&entries[0], &entries[2], &entries[3]]
            .map(String::as_str)
            .concat(),
    )
    .unwrap();
    d.signal("-HUP");
    d.expect("reload: 2/xvdb no longer listed; detaching");
    d.expect("/local/domain/0/backend/vbd3/2/51728: removed");
    let list = ctl(&["list"]);
    assert!(!list.contains("2/xvdb"), "{list}");
    assert!(
        list.contains("1/xvdb domain=1 guest=g1 vbd=xvdb state=Connected size=67108864 stack=file"),
        "{list}"
    );
    assert!(
        list.contains(
            "1/xvdc domain=1 guest=g1 vbd=xvdc state=Connected size=536870912 stack=file"
        ),
        "{list}"
    );
    assert!(list.contains("3/xvdb domain=3 guest=g3"), "{list}");

    // g1's first entry deleted: its xvdb goes; xvdc keeps serving the 512 MiB image, never
    // swapped onto another image.
    std::fs::write(
        &config,
        [&entries[2], &entries[3]].map(String::as_str).concat(),
    )
    .unwrap();
    d.signal("-HUP");
    d.expect("reload: 1/xvdb no longer listed; detaching");
    d.expect("/local/domain/0/backend/vbd3/1/51728: removed");
    let list = ctl(&["list"]);
    assert!(!list.contains("1/xvdb"), "{list}");
    assert!(
        list.contains(
            "1/xvdc domain=1 guest=g1 vbd=xvdc state=Connected size=536870912 stack=file"
        ),
        "{list}"
    );
    let lines = d.terminate();
    assert!(
        !lines.iter().any(|l| l.contains(": now ")),
        "a reload swapped a plugin:\n{}",
        lines.join("\n")
    );
}

#[test]
fn two_disks_at_one_vbd_are_one_error() {
    let t = TempDir::new("serve-dup-vbd");
    let (a, b) = (t.join("a.img"), t.join("b.img"));
    for p in [&a, &b] {
        std::fs::File::create(p).unwrap().set_len(1 << 20).unwrap();
    }
    let config = t.join("disks.toml");
    let at_xvdb = |p: &std::path::Path| {
        file_entry("guest1", p).replace("plugin = ", "vbd = \"xvdb\"\nplugin = ")
    };
    std::fs::write(&config, at_xvdb(&a) + &at_xvdb(&b)).unwrap();
    assert_bad_input(
        &host(&["serve", "--sim", "--config", config.to_str().unwrap()]),
        &["disks.toml", "disks 1 and 2", "xvdb"],
    );

    // Brought in by a reload: one warning, and the running disk serves on.
    std::fs::write(&config, at_xvdb(&a)).unwrap();
    let (mut d, ctl) = serve_sim(&t, &config);
    d.expect_all(&["guest 1 connected", "/51728: 1048576 bytes"]);
    std::fs::write(&config, at_xvdb(&a) + &at_xvdb(&b)).unwrap();
    d.signal("-HUP");
    d.expect_all(&[
        "reload:",
        "disks 1 and 2",
        "keeping the running configuration",
    ]);
    assert!(ctl(&["list"]).contains("1/xvdb domain=1 guest=guest1 vbd=xvdb state=Connected"));
    // A disk that cannot attach (its vbd taken by another backend's device) says so once.
    let text = file_entry("guest1", &b).replace("plugin = ", "vbd = \"xvdb\"\nplugin = ");
    std::fs::write(&config, at_xvdb(&a).replace("guest1", "1") + &text).unwrap();
    d.signal("-HUP");
    d.expect("reload: disk 1 added");
    d.expect("disk 1: domain 1 already has a disk at xvdb");
    std::thread::sleep(Duration::from_secs(2));
    let lines = d.terminate();
    let repeats = lines
        .iter()
        .filter(|l| l.contains("already has a disk at xvdb"))
        .count();
    assert_eq!(repeats, 1, "{}", lines.join("\n"));
}

#[test]
fn serve_sim_second_sigterm_forces_a_device_stuck_in_closing() {
    let t = TempDir::new("serve-force");
    let a = t.join("a.img");
    std::fs::File::create(&a).unwrap().set_len(1 << 20).unwrap();
    let config = t.join("disks.toml");
    std::fs::write(&config, file_entry("guest1", &a)).unwrap();
    let (mut d, _ctl) = serve_sim(&t, &config);
    d.expect("guest 1 connected");
    // A toolstack device for a guest that says it published its rings but never did: the
    // backend fails to connect, goes Closing and waits for a frontend that never closes.
    let xs = XsClient::connect_unix(&t.join("xs.sock")).unwrap();
    let (be, fe) = (
        "/local/domain/0/backend/vbd3/9/51728",
        "/local/domain/9/device/vbd/51728",
    );
    transaction(&xs, |tx| {
        for (k, v) in [
            ("frontend", fe),
            ("frontend-id", "9"),
            ("online", "1"),
            ("state", "1"),
            ("params", &format!("file:{}", a.display())),
        ] {
            xs.write(tx, &format!("{be}/{k}"), v.as_bytes())?;
        }
        for (k, v) in [("backend", be), ("backend-id", "0"), ("state", "3")] {
            xs.write(tx, &format!("{fe}/{k}"), v.as_bytes())?;
        }
        Ok(())
    })
    .unwrap();
    d.expect(&format!("{be}: serving for domain 9"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while xs.read(NO_TX, &format!("{be}/state")).ok().as_deref() != Some(b"5") {
        assert!(Instant::now() < deadline, "the device never went Closing");
        std::thread::sleep(Duration::from_millis(50));
    }
    d.signal("-TERM");
    d.expect("stopping: closing");
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "serve stopped without waiting for the device in Closing"
    );
    d.signal("-TERM");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = d.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "a second SIGTERM did not force serve --sim to stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_reload_whose_plugin_never_opens_holds_up_nothing() {
    let t = TempDir::new("serve-reload-hang");
    let (a, fifo) = (t.join("a.img"), t.join("hang.img"));
    std::fs::File::create(&a).unwrap().set_len(1 << 20).unwrap();
    // The file plugin opening a FIFO read-only waits for a writer that never comes.
    mkfifo(&fifo);
    let config = t.join("disks.toml");
    std::fs::write(&config, file_entry("guest1", &a)).unwrap();
    let (mut d, _ctl) = serve_sim_env(&t, &config, &[("XEN_DISK_OPEN_TIMEOUT", "2")]);
    d.expect("guest 1 connected");
    let hanging = file_entry("guest1", &fifo).replace("plugin = ", "readonly = true\nplugin = ");
    std::fs::write(&config, file_entry("guest1", &a) + &hanging).unwrap();
    d.signal("-HUP");
    d.expect_all(&["reload: disk 2", "not opened within 2 s"]);
    // The daemon's loop went on: a later reload is applied, and SIGTERM stops it.
    std::fs::write(&config, file_entry("guest1", &a)).unwrap();
    d.signal("-HUP");
    std::thread::sleep(Duration::from_millis(500));
    let lines = d.terminate();
    assert_eq!(
        lines.last().map(String::as_str),
        Some("stopped"),
        "{lines:?}"
    );
}
