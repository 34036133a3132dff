//! The gntdev and evtchn ioctl numbers and argument layouts used on real Xen, checked
//! against the kernel's UAPI headers (`/usr/include/xen/gntdev.h`, `evtchn.h`) by compiling
//! C `_Static_assert`s; and, on a machine without Xen, one clear error when opening them.

use std::mem::{offset_of, size_of};
use std::process::Command;
use xen_disk_host::xen::linux::{evtchn as ev, gntdev as gd};

fn compile(asserts: &[(String, u64)]) -> Result<(), String> {
    let mut c = String::from("#include <stddef.h>\n#include <sys/ioctl.h>\n#include <stdint.h>\ntypedef uint32_t grant_ref_t; /* as the kernel defines them */\ntypedef uint16_t domid_t;\n#include <xen/gntdev.h>\n#include <xen/evtchn.h>\n");
    for (expr, value) in asserts {
        c.push_str(&format!(
            "_Static_assert(({expr}) == {value}UL, \"{expr} should be {value}\");\n"
        ));
    }
    let dir =
        std::env::temp_dir().join(format!("ioctls-{}-{}", std::process::id(), next_scratch()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("check{}.c", asserts.len()));
    std::fs::write(&file, c).unwrap();
    let out = Command::new("gcc")
        .args(["-fsyntax-only"])
        .arg(&file)
        .output()
        .map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&dir);
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn ours() -> Vec<(String, u64)> {
    let v = |e: &str, n: u64| (e.to_string(), n);
    vec![
        v("IOCTL_GNTDEV_MAP_GRANT_REF", gd::IOCTL_GNTDEV_MAP_GRANT_REF),
        v(
            "IOCTL_GNTDEV_UNMAP_GRANT_REF",
            gd::IOCTL_GNTDEV_UNMAP_GRANT_REF,
        ),
        v("IOCTL_GNTDEV_GRANT_COPY", gd::IOCTL_GNTDEV_GRANT_COPY),
        v(
            "sizeof(struct ioctl_gntdev_grant_ref)",
            size_of::<gd::GrantRef>() as u64,
        ),
        v(
            "offsetof(struct ioctl_gntdev_grant_ref, ref)",
            offset_of!(gd::GrantRef, gref) as u64,
        ),
        v(
            "sizeof(struct ioctl_gntdev_map_grant_ref)",
            size_of::<gd::MapGrantRef<1>>() as u64,
        ),
        v(
            "offsetof(struct ioctl_gntdev_map_grant_ref, index)",
            offset_of!(gd::MapGrantRef<1>, index) as u64,
        ),
        v(
            "offsetof(struct ioctl_gntdev_map_grant_ref, refs)",
            offset_of!(gd::MapGrantRef<1>, refs) as u64,
        ),
        v(
            "sizeof(struct ioctl_gntdev_unmap_grant_ref)",
            size_of::<gd::UnmapGrantRef>() as u64,
        ),
        v(
            "offsetof(struct ioctl_gntdev_unmap_grant_ref, count)",
            offset_of!(gd::UnmapGrantRef, count) as u64,
        ),
        v(
            "IOCTL_EVTCHN_BIND_INTERDOMAIN",
            ev::IOCTL_EVTCHN_BIND_INTERDOMAIN,
        ),
        v("IOCTL_EVTCHN_UNBIND", ev::IOCTL_EVTCHN_UNBIND),
        v("IOCTL_EVTCHN_NOTIFY", ev::IOCTL_EVTCHN_NOTIFY),
        v("IOCTL_EVTCHN_RESET", ev::IOCTL_EVTCHN_RESET),
        v(
            "sizeof(struct ioctl_evtchn_bind_interdomain)",
            size_of::<ev::BindInterdomain>() as u64,
        ),
        v(
            "offsetof(struct ioctl_evtchn_bind_interdomain, remote_port)",
            offset_of!(ev::BindInterdomain, remote_port) as u64,
        ),
        v(
            "sizeof(struct ioctl_evtchn_notify)",
            size_of::<ev::PortArg>() as u64,
        ),
    ]
}

#[test]
fn ioctl_numbers_and_layouts_match_the_kernel_headers() {
    compile(&ours())
        .unwrap_or_else(|e| panic!("differs from the kernel's xen/gntdev.h or evtchn.h:\n{e}"));
    // And the check can fail.
    let mut wrong = ours();
    wrong[0].1 += 1;
    assert!(compile(&wrong)
        .unwrap_err()
        .contains("IOCTL_GNTDEV_MAP_GRANT_REF"));
}

#[test]
fn opening_the_devices_without_xen_is_one_clear_error() {
    use xen_disk_host::xen::evtchn::EventChannels;
    let have_xen = std::path::Path::new(gd::GNTDEV).exists();
    match gd::Gntdev::open() {
        Ok(_) => assert!(have_xen, "opened {} on a machine without it", gd::GNTDEV),
        Err(e) => {
            assert!(!have_xen, "{e}");
            let text = e.to_string();
            assert!(
                text.contains("/dev/xen/gntdev") && text.contains("--sim") && !text.contains('\n'),
                "{text}"
            );
        }
    }
    if !std::path::Path::new(ev::EVTCHN).exists() {
        let e = ev::LinuxEventChannels
            .bind_interdomain(1, 1)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("/dev/xen/evtchn") && e.contains("--sim"), "{e}");
    }
}

/// A number no other compile of this process uses: tests run in parallel, each in its own folder.
fn next_scratch() -> usize {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}
