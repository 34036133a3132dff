//! `scripts/pairs.sh`, which gathers the README's same-run pairs: three runs of the ring
//! bench on the discard plugin beside nbdkit's null plugin (needs nbdkit and fio).

mod common;
use common::*;
use std::path::Path;
use std::process::Command;

fn pairs(args: &[&str]) -> std::process::Output {
    build_all();
    Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/pairs.sh"))
        .args(args)
        .env("XEN_DISK_HOST", target_dir().join("xen-disk-host"))
        .env("XEN_DISK_PLUGIN_PATH", target_dir())
        .output()
        .expect("bash")
}

#[test]
fn pairs_prints_every_pair_and_the_median_ratio() {
    let o = pairs(&[
        "3",
        "discard",
        "--rw",
        "randread",
        "--bs",
        "4k",
        "--seconds",
        "0.2",
        "--nbdkit",
    ]);
    let out = stdout(&o);
    assert!(o.status.success(), "{out}{}", stderr(&o));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    let mut ratios = Vec::new();
    for (i, l) in lines[..3].iter().enumerate() {
        // pair N: plugin P iops, nbdkit R iops, ratio P/R
        let w: Vec<&str> = l.split([' ', ',']).filter(|w| !w.is_empty()).collect();
        assert_eq!(w[..2], ["pair", &format!("{}:", i + 1)], "{l}");
        let (p, r, ratio): (f64, f64, f64) = (
            w[3].parse().unwrap(),
            w[6].parse().unwrap(),
            w[9].parse().unwrap(),
        );
        assert!(p > 0.0 && r > 0.0, "{l}");
        assert!((ratio - p / r).abs() < 0.001, "{l}");
        ratios.push(ratio);
    }
    ratios.sort_by(f64::total_cmp);
    let want = format!("median ratio {:.3} of nbdkit over 3 pairs", ratios[1]);
    assert!(lines[3].starts_with(&want), "want {want:?}:\n{out}");
}

#[test]
fn pairs_refuses_a_bad_count_and_stops_at_a_failed_bench() {
    let o = pairs(&["x", "discard"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("usage"), "{}", stderr(&o));
    let o = pairs(&["2", "discard", "--bs", "1000"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--bs"), "{}", stderr(&o));
    assert!(stdout(&o).is_empty(), "{}", stdout(&o));
}
