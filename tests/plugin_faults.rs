//! A plugin's errors and panics cross the `.so` boundary as values, in every operation,
//! and the host process carries on.

mod common;
use common::*;
use xen_disk_host::plugin::{load, GuardedDisk};
use xen_disk_plugin_api::{with_read_bufs, with_write_bufs, Config, ErrorKind};

fn open(fail_in: &str, panic: bool) -> Result<GuardedDisk, String> {
    let plugin = load(&plugin_path("test-faulty")).map_err(|e| e.to_string())?;
    let config =
        Config::from_pairs(&[format!("fail-in={fail_in}"), format!("panic={panic}")]).unwrap();
    let disk = plugin.open(&config).map_err(|e| e.to_string())?;
    GuardedDisk::new(Box::new(disk), false).map_err(|e| e.to_string())
}

#[test]
fn errors_come_back_with_kind_errno_and_message() {
    let d = open("read", false).unwrap();
    let mut buf = [0u8; 512];
    let e = with_read_bufs(&mut [&mut buf], |b| d.read(0, b)).unwrap_err();
    assert_eq!((e.kind(), e.errno()), (ErrorKind::Io, 5));
    assert_eq!(e.message(), "deliberate error in read");
    // The other operations still work.
    with_write_bufs(&[&buf], |b| d.write(0, b, false)).unwrap();
}

#[test]
fn panics_in_every_operation_come_back_as_errors() {
    let mut buf = [0u8; 512];
    let d = open("read", true).unwrap();
    let e = with_read_bufs(&mut [&mut buf], |b| d.read(0, b)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Panic);
    assert!(e.message().contains("deliberate panic in read"), "{e}");
    // The disk is still usable after a contained panic.
    with_write_bufs(&[&buf], |b| d.write(512, b, false)).unwrap();

    let d = open("write", true).unwrap();
    let e = with_write_bufs(&[&buf], |b| d.write(0, b, false)).unwrap_err();
    assert!(e.message().contains("deliberate panic in write"), "{e}");
    // FUA on a disk without native FUA is write + flush: the write's panic surfaces.
    let e = with_write_bufs(&[&buf], |b| d.write(0, b, true)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Panic);

    let d = open("flush", true).unwrap();
    assert!(d
        .flush()
        .unwrap_err()
        .message()
        .contains("deliberate panic in flush"));

    let e = open("open", true).err().unwrap();
    assert!(e.contains("deliberate panic in open"), "{e}");
}

#[test]
fn check_reports_a_panicking_plugin_as_failures_not_a_crash() {
    let p = plugin_path("test-faulty");
    let o = host(&[
        "check",
        "--destructive",
        p.to_str().unwrap(),
        "-c",
        "fail-in=write",
        "-c",
        "panic=true",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}{}", stdout(&o), stderr(&o));
    assert!(
        stdout(&o).contains("FAIL  pattern") && stdout(&o).contains("deliberate panic in write"),
        "{}",
        stdout(&o)
    );
    assert!(stdout(&o).contains("failed"), "{}", stdout(&o));
}
