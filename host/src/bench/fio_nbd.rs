//! fio's `nbd` engine against an NBD server given by URI: the reference for NBD client
//! plugins (`bench nbd-client -c uri=U --fio-nbd`), measured on the same server with the
//! same pattern, block size, depth, region and duration as the plugin. fio runs one job that
//! keeps `iodepth` requests in flight on one connection through libnbd's asynchronous API.

use super::direct::Pattern;
use std::process::{Command, Stdio};
use std::time::Duration;

/// What fio measured.
#[derive(Debug, Clone, Copy)]
pub struct NbdFigures {
    /// Operations per second.
    pub iops: f64,
    /// Megabytes (10^6) per second.
    pub mbps: f64,
}

/// Runs fio's nbd engine against `uri` over the first `region` bytes of the export.
pub fn run(
    uri: &str,
    pattern: Pattern,
    bs: usize,
    iodepth: usize,
    region: u64,
    duration: Duration,
) -> Result<NbdFigures, String> {
    let rw = match pattern {
        Pattern::Read => "read",
        Pattern::Write => "write",
        Pattern::Randread => "randread",
        Pattern::Randwrite => "randwrite",
    };
    let out = Command::new("fio")
        .args([
            "--name=fio-nbd",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            &format!("--rw={rw}"),
            &format!("--bs={bs}"),
            &format!("--iodepth={iodepth}"),
            &format!("--size={region}"),
            &format!("--runtime={}ms", duration.as_millis().max(1)),
            "--time_based",
            "--output-format=terse",
            "--terse-version=3",
        ])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("fio: {e} (install fio for the NBD reference)"))?;
    if !out.status.success() {
        return Err(format!(
            "fio failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    parse_terse(
        &text,
        matches!(pattern, Pattern::Read | Pattern::Randread),
        bs,
    )
    .ok_or_else(|| format!("fio printed no terse result line: {}", text.trim()))
}

/// Terse version 3: field 8 is read IOPS, field 49 write IOPS (1-based).
pub(crate) fn parse_terse(text: &str, reading: bool, bs: usize) -> Option<NbdFigures> {
    let line = text.lines().find(|l| l.starts_with("3;"))?;
    let fields: Vec<&str> = line.split(';').collect();
    let iops: f64 = fields.get(if reading { 7 } else { 48 })?.parse().ok()?;
    Some(NbdFigures {
        iops,
        mbps: iops * bs as f64 / 1e6,
    })
}

/// `--fio-nbd [URI]`: `None` when not asked for; an empty URI means the plugin's `uri` key.
pub fn from_cli(
    uri: Option<&str>,
    config: &xen_disk_plugin_api::Config,
    (pattern, bs, iodepth, region, duration): (Pattern, usize, usize, u64, Duration),
) -> anyhow::Result<Option<NbdFigures>> {
    let Some(uri) = uri else { return Ok(None) };
    let uri = if uri.is_empty() {
        match config.value("uri").and_then(|v| v.as_str()) {
            Some(u) => u.to_string(),
            None => anyhow::bail!("--fio-nbd: give a URI, or a plugin with a `uri` key"),
        }
    } else {
        uri.to_string()
    };
    run(&uri, pattern, bs, iodepth, region, duration)
        .map(Some)
        .map_err(|e| anyhow::anyhow!("--fio-nbd {uri}: {e}"))
}

/// The JSON fields for the figures (empty when none).
pub fn json_fields(f: Option<NbdFigures>) -> String {
    f.map(|n| {
        format!(
            ",\"fio_nbd_iops\":{:.0},\"fio_nbd_mbps\":{:.1}",
            n.iops, n.mbps
        )
    })
    .unwrap_or_default()
}

/// The text lines for the figures, with the plugin's IOPS as a ratio.
pub fn print_text(f: Option<NbdFigures>, plugin_iops: f64) {
    if let Some(n) = f {
        println!(
            "  fio-nbd: {:>11.0} IOPS {:>10.1} MB/s  (fio nbd engine, same server, same run)",
            n.iops, n.mbps
        );
        println!("  ratio:  {:.3} of fio-nbd", plugin_iops / n.iops.max(1e-9));
    }
}
