//! Where the file plugin's calls run: an image in memory (tmpfs, here `/dev/shm`) is served
//! on the ring thread (`NonBlocking`), one on a disk filesystem or opened `O_DIRECT` on
//! workers (`Parallel`). Needs a tmpfs at /dev/shm, as every Linux with devtmpfs mounts it;
//! without one this test fails rather than skips.

use file::FilePlugin;
use std::path::Path;
use xen_disk_plugin_api::*;

fn model(path: &Path, extra: &[&str]) -> ThreadModel {
    let mut pairs = vec![format!("path={}", path.display())];
    pairs.extend(extra.iter().map(|s| s.to_string()));
    let disk = ForeignDisk::open(
        __root_module::<FilePlugin>(),
        &Config::from_pairs(&pairs).unwrap(),
    )
    .unwrap();
    disk.info().thread_model
}

#[test]
fn memory_images_run_inline_others_on_workers() {
    let shm = tempfile::tempdir_in("/dev/shm").expect("a tmpfs at /dev/shm");
    let in_memory = shm.path().join("disk.img");
    std::fs::write(&in_memory, vec![7u8; 1 << 20]).unwrap();
    assert_eq!(model(&in_memory, &[]), ThreadModel::NonBlocking);
    // Read-only changes nothing: the copy still never waits.
    assert_eq!(
        model(&in_memory, &["readonly=true"]),
        ThreadModel::NonBlocking
    );

    // The build's own directory is on a disk filesystem (never tmpfs on this project's
    // machines: cargo's target directory holds gigabytes).
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let on_disk = dir.path().join("disk.img");
    std::fs::write(&on_disk, vec![7u8; 1 << 20]).unwrap();
    assert_eq!(model(&on_disk, &[]), ThreadModel::Parallel);
}
