//! Building what `cargo build --workspace` does not: C plugins (with `cc`) and the ABI 1.0
//! fossil (a cargo workspace of its own). Both land in the target directory next to the
//! Rust plugins, so the host finds them by name.

#![allow(dead_code)] // each test binary uses part of it

use crate::common::{build_all, target_dir};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// The repository root (the `xen-disk` package's directory).
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Serializes builds within one test binary (tests run on several threads).
static BUILDING: Mutex<()> = Mutex::new(());

/// Compiles the C plugin `source` (relative to the repository) with `cc` into
/// `target/<profile>/lib<name>.so`, with `defines` (`-D...`) added. Warnings are errors:
/// the header must compile clean.
pub fn cc_plugin(source: &str, name: &str, defines: &[&str]) -> PathBuf {
    build_all();
    let _one = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    let out = target_dir().join(format!("lib{name}.so"));
    // Another test binary may be loading the same file: build aside, then rename over it.
    let tmp = target_dir().join(format!(".lib{name}.so.{}", std::process::id()));
    let status = Command::new("cc")
        .args([
            "-shared", "-fPIC", "-O2", "-std=c11", "-Wall", "-Wextra", "-Werror",
        ])
        .args(defines)
        .arg("-I")
        .arg(repo().join("plugin-api/include"))
        .arg("-o")
        .arg(&tmp)
        .arg(repo().join(source))
        .status()
        .expect("run cc (the C compiler; .ci/run installs gcc)");
    assert!(status.success(), "cc {source} failed");
    std::fs::rename(&tmp, &out).unwrap();
    out
}

/// Builds the ABI 1.0 fossil plugin with cargo (its own workspace, same target directory)
/// and returns its path.
pub fn fossil() -> PathBuf {
    build_all();
    let _one = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--locked", "--manifest-path"])
        .arg(repo().join("tests/fixtures/fossil-1.0/Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir().parent().expect("target/<profile>"));
    if target_dir().file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("run cargo build for the fossil");
    assert!(status.success(), "building the ABI 1.0 fossil failed");
    target_dir().join("libtest_fossil_1_0.so")
}
