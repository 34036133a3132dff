//! Disks from `xl` configs, on the simulated hypervisor: `serve --sim --descriptors DIR`
//! answers devices written the way libxl 4.20 writes `backendtype=tap` disks (`params` =
//! `aio:<target>` or `vhd:<target>`, `script` = the hotplug script), a target in the
//! descriptor directory brings any plugin (qcow2, cow over a gold image), a raw disk holding a
//! qcow2 header is still served raw, the project's hotplug script (`dist/hotplug/
//! block-xen-disk`, run as libxl runs it: `add`/`remove` with `XENBUS_PATH`) confirms a
//! device serve answered and fails one serve refused with serve's reason, and libxl's detach
//! (online=0, Closing, wait for Closed, remove) and re-creation at the same device work.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use xen_disk_host::xen::xenstore::client::XsClient;
use xen_disk_host::xen::xenstore::{transaction, Access, Perm, Xenstore, NO_TX};

fn perm(domid: u32, access: Access) -> Perm {
    Perm { domid, access }
}

/// Writes a device of domain 1 as libxl does for `backendtype=tap`: both directories in one
/// transaction, `params` and `script` in the backend's.
fn libxl_add(xs: &XsClient, devid: u32, params: &str) -> String {
    let be = format!("/local/domain/0/backend/vbd3/1/{devid}");
    let fe = format!("/local/domain/1/device/vbd/{devid}");
    transaction(xs, |tx| {
        xs.mkdir(tx, &be)?;
        xs.set_perms(tx, &be, &[perm(0, Access::None), perm(1, Access::Read)])?;
        xs.mkdir(tx, &fe)?;
        xs.set_perms(tx, &fe, &[perm(1, Access::None), perm(0, Access::Read)])?;
        for (k, v) in [
            ("frontend", fe.as_str()),
            ("frontend-id", "1"),
            ("online", "1"),
            ("removable", "1"),
            ("bootable", "1"),
            ("state", "1"),
            ("dev", "xvdz"),
            ("type", "vbd3"),
            ("mode", "w"),
            ("device-type", "disk"),
            ("discard-enable", "1"),
            ("params", params),
            ("script", "/etc/xen/scripts/block-xen-disk"),
        ] {
            xs.write(tx, &format!("{be}/{k}"), v.as_bytes())?;
        }
        for (k, v) in [
            ("backend", be.as_str()),
            ("backend-id", "0"),
            ("state", "1"),
            ("virtual-device", &devid.to_string()),
            ("device-type", "disk"),
        ] {
            xs.write(tx, &format!("{fe}/{k}"), v.as_bytes())?;
        }
        Ok(())
    })
    .unwrap();
    be
}

/// libxl's attach of a descriptor: the directories, InitWait awaited, the hotplug script's
/// `add` (which must succeed).
fn libxl_attach(xs: &XsClient, xenstored: &Path, devid: u32, descriptor: &Path) -> String {
    let be = libxl_add(xs, devid, &format!("aio:{}", descriptor.display()));
    wait_for(xs, &format!("{be}/state"), b"2");
    let (ok, err) = hotplug(xenstored, &be, "add");
    assert!(ok, "{err}");
    be
}

/// Waits (up to 30 s) for `path` to hold `want`.
fn wait_for(xs: &XsClient, path: &str, want: &[u8]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = xs.read(NO_TX, path).ok();
        if now.as_deref() == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{path} is {:?}, want {:?}",
            now.map(|v| String::from_utf8_lossy(&v).into_owned()),
            String::from_utf8_lossy(want)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// libxl's detach: online=0 and Closing, wait for the backend's Closed, run the hotplug
/// script's `remove`, remove both directories.
fn libxl_remove(xs: &XsClient, xenstored: &Path, be: &str) {
    transaction(xs, |tx| {
        xs.write(tx, &format!("{be}/online"), b"0")?;
        xs.write(tx, &format!("{be}/state"), b"5")
    })
    .unwrap();
    wait_for(xs, &format!("{be}/state"), b"6");
    let (ok, _) = hotplug(xenstored, be, "remove");
    assert!(ok, "hotplug remove failed");
    let fe = String::from_utf8(xs.read(NO_TX, &format!("{be}/frontend")).unwrap()).unwrap();
    xs.rm(NO_TX, &fe).unwrap();
    xs.rm(NO_TX, be).unwrap();
}

fn hotplug_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/hotplug/block-xen-disk")
}

/// Runs the hotplug script as libxl does (`add` or `remove`, `XENBUS_PATH`), against the
/// simulated xenstored; its success and stderr.
fn hotplug(xenstored: &Path, be: &str, action: &str) -> (bool, String) {
    let o = Command::new("sh")
        .arg(hotplug_script())
        .arg(action)
        .env("XENBUS_PATH", be)
        .env("XENSTORED_PATH", xenstored)
        .output()
        .expect("sh");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn read(xs: &XsClient, path: &str) -> String {
    String::from_utf8_lossy(&xs.read(NO_TX, path).unwrap()).into_owned()
}

#[test]
fn xl_style_devices_reach_every_route_and_detach_as_libxl_does() {
    let t = TempDir::new("serve-xl");
    let descriptors = t.join("xl");
    std::fs::create_dir(&descriptors).unwrap();
    // One configured disk makes the simulated guest (domain 1) exist.
    let first = t.join("first.img");
    random_file(&first, 1 << 20, 1);
    let config = t.join("disks.toml");
    std::fs::write(
        &config,
        format!(
            "[[disk]]\ndomain = \"1\"\nplugin = \"file\"\nvbd = \"xvda\"\n[disk.plugin-config]\npath = \"{}\"\n",
            first.display()
        ),
    )
    .unwrap();
    let (xs_sock, control) = (t.join("xs.sock"), t.join("control.sock"));
    let mut d = Running::host(&[
        "serve",
        "--sim",
        "--config",
        config.to_str().unwrap(),
        "--xenstore-socket",
        xs_sock.to_str().unwrap(),
        "--control",
        control.to_str().unwrap(),
        "--descriptors",
        descriptors.to_str().unwrap(),
    ]);
    d.expect_all(&["guest 1 connected", "/51712"]);
    let xs = XsClient::connect_unix(&xs_sock).unwrap();
    let ctl_list = || {
        stdout(&host(&[
            "ctl",
            "--socket",
            control.to_str().unwrap(),
            "list",
        ]))
    };

    // format=raw: a raw file whose first sector is a qcow2 header (as a guest could have
    // written) is served raw, at its own size.
    let raw = t.join("raw.img");
    random_file(&raw, 3 << 20, 2);
    let mut bytes = std::fs::read(&raw).unwrap();
    bytes[..32].copy_from_slice(
        b"QFI\xfb\x00\x00\x00\x03\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x10\x00\x00\x01\x00\x00\x00\x00\x00",
    );
    std::fs::write(&raw, &bytes).unwrap();
    let be_raw = libxl_add(&xs, 51728, &format!("aio:{}", raw.display()));
    // As blkback waits for its script's physical-device: InitWait, and no further until the
    // hotplug script has run, however ready the guest is (libxl runs the script only once it
    // has seen InitWait, so it must still be there).
    wait_for(&xs, &format!("{be_raw}/state"), b"2");
    wait_for(&xs, "/local/domain/1/device/vbd/51728/state", b"3");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(read(&xs, &format!("{be_raw}/state")), "2");
    let (ok, err) = hotplug(&xs_sock, &be_raw, "add");
    assert!(ok, "{err}");
    d.expect_all(&["guest 1 connected", "/51728: 3145728 bytes"]);
    assert_eq!(read(&xs, &format!("{be_raw}/hotplug-status")), "connected");
    assert!(ctl_list().contains("1/xvdb domain=1"), "{}", ctl_list());
    assert!(
        ctl_list().contains("size=3145728 stack=file"),
        "{}",
        ctl_list()
    );

    // A descriptor: qcow2 (created by the plugin), and cow over a gold image.
    std::fs::write(
        descriptors.join("q.toml"),
        format!(
            "plugin = \"qcow2\"\n[plugin-config]\npath = \"{}\"\ncreate = true\nsize = \"8M\"\n",
            t.join("q.qcow2").display()
        ),
    )
    .unwrap();
    let be_q = libxl_attach(&xs, &xs_sock, 51744, &descriptors.join("q.toml"));
    d.expect_all(&["guest 1 connected", "/51744: 8388608 bytes"]);
    let gold = t.join("gold.img");
    random_file(&gold, 2 << 20, 3);
    std::fs::write(
        descriptors.join("c.toml"),
        format!(
            "plugin = \"cow\"\n[plugin-config]\noverlay = \"{}\"\n[plugin-config.base]\nplugin = \"file\"\npath = \"{}\"\n",
            t.join("c.cow").display(),
            gold.display()
        ),
    )
    .unwrap();
    let be_c = libxl_attach(&xs, &xs_sock, 51760, &descriptors.join("c.toml"));
    d.expect_all(&["guest 1 connected", "/51760: 2097152 bytes"]);
    let list = ctl_list();
    assert!(list.contains("1/xvdc domain=1"), "{list}");
    assert!(list.contains("size=8388608 stack=qcow2"), "{list}");
    assert!(list.contains("size=2097152 stack=cow over file"), "{list}");

    // A descriptor named with format=vhd, and one that does not exist: serve refuses each
    // with an error node naming the file, and the hotplug script fails libxl's attach with
    // that reason.
    for (devid, params, needle) in [
        (
            51776,
            format!("vhd:{}", descriptors.join("q.toml").display()),
            "a descriptor is named with format=raw".to_string(),
        ),
        (
            51792,
            format!("aio:{}", descriptors.join("none.toml").display()),
            descriptors.join("none.toml").display().to_string(),
        ),
    ] {
        let be = libxl_add(&xs, devid, &params);
        wait_for(&xs, &format!("{be}/state"), b"5");
        assert!(read(&xs, &format!("{be}/error")).contains(&needle));
        let (ok, err) = hotplug(&xs_sock, &be, "add");
        assert!(!ok, "hotplug add passed on a refused device");
        assert!(err.contains(&needle), "{err}");
        assert!(read(&xs, &format!("{be}/hotplug-error")).contains(&needle));
        xs.rm(NO_TX, &format!("/local/domain/1/device/vbd/{devid}"))
            .unwrap();
        xs.rm(NO_TX, &be).unwrap();
    }

    // libxl's block-detach of the qcow2 disk: the guest lets go, the backend goes Closed,
    // libxl removes the directories; serve forgets the device.
    libxl_remove(&xs, &xs_sock, &be_q);
    d.expect(&format!("{be_q}: removed"));
    assert!(!ctl_list().contains("1/xvdc "), "{}", ctl_list());
    // And a device made again at the same place (block-detach, then block-attach): served
    // again, over the overlay file it had.
    libxl_remove(&xs, &xs_sock, &be_c);
    d.expect(&format!("{be_c}: removed"));
    d.forget_seen();
    let be_c = libxl_attach(&xs, &xs_sock, 51760, &descriptors.join("c.toml"));
    d.expect_all(&["guest 1 connected", "/51760: 2097152 bytes"]);
    wait_for(&xs, &format!("{be_c}/state"), b"4");
    assert!(ctl_list().contains("stack=cow over file"), "{}", ctl_list());
    assert!(t.join("c.cow").exists());

    // A directory with `params` and no `frontend` (a toolstack writing without transactions,
    // or half torn down) is left alone, not refused: refusing writes `error` and `state`,
    // which would make a directory the toolstack is removing exist again. Once another device
    // made after it is served, serve has looked at it.
    let partial = "/local/domain/0/backend/vbd3/1/51808";
    xs.write(
        NO_TX,
        &format!("{partial}/params"),
        format!("aio:{}", raw.display()).as_bytes(),
    )
    .unwrap();
    xs.write(NO_TX, &format!("{partial}/state"), b"1").unwrap();
    let later = libxl_attach(&xs, &xs_sock, 51824, &descriptors.join("q.toml"));
    wait_for(&xs, &format!("{later}/state"), b"4");
    assert!(xs.read(NO_TX, &format!("{partial}/error")).is_err());
    assert_eq!(read(&xs, &format!("{partial}/state")), "1");
    xs.rm(NO_TX, partial).unwrap();

    // A hotplug `add` with no serve answering (nothing moves the backend past Initialising)
    // fails and says why.
    let lone = "/local/domain/0/backend/vbd3/5/51712";
    xs.write(NO_TX, &format!("{lone}/state"), b"1").unwrap();
    let (ok, err) = hotplug(&xs_sock, lone, "add");
    assert!(!ok);
    assert!(err.contains("is xen-disk-host serve running?"), "{err}");
    d.terminate();
}

#[test]
fn the_hotplug_script_wants_libxls_environment() {
    let o = Command::new("sh")
        .arg(hotplug_script())
        .arg("add")
        .env_remove("XENBUS_PATH")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "block-xen-disk: XENBUS_PATH is not set (run by libxl only)\n"
    );
}
