//! Compressed clusters: raw deflate streams inflated to exactly one cluster.

use xen_disk_plugin_api::{Error, Result};

/// Inflates `data` into `out` (one cluster); the stream must fill it exactly.
pub fn inflate_cluster(name: &str, host: u64, data: &[u8], out: &mut [u8]) -> Result<()> {
    use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
    use miniz_oxide::inflate::TINFLStatus;
    let mut st = Box::<DecompressorOxide>::default();
    let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
    let (status, _, written) = decompress(&mut st, data, out, 0, flags);
    match status {
        TINFLStatus::Done | TINFLStatus::HasMoreOutput if written == out.len() => Ok(()),
        _ => Err(Error::corrupt(format!(
            "{name}: compressed cluster at {host:#x} does not inflate to one cluster ({status:?}, {written} bytes)"
        ))),
    }
}
