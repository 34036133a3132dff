//! The guest's half of the xenbus handshake (`docs/protocol.md#handshake`), as Linux blkfront
//! does it:
//!
//! ```text
//!  backend InitWait ─▶ read max-ring-page-order, multi-queue-max-queues, feature-persistent
//!    ─▶ set up rings ─▶ one transaction: ring-ref*, ring-page-order, event-channel(s),
//!       multi-queue-num-queues, protocol, feature-persistent ─▶ state Initialised
//!  backend Connected ─▶ read sectors, info, sector-size, features ─▶ state Connected
//! ```

use super::queue::{FrontQueue, FrontendError};
use crate::blkif::abi::{Protocol, MAX_RING_PAGE_ORDER};
use crate::blkif::keys::FEATURE_PERSISTENT;
use crate::xen::sim::hypervisor::SimDomain;
use crate::xen::xenbus::{read_state, write_state, XenbusState};
use crate::xen::xenstore::{read_string, read_u32, transaction, Xenstore, NO_TX};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the frontend asks for, capped by what the backend offers.
#[derive(Debug, Clone, Copy)]
pub struct Wishes {
    /// log2 ring pages wanted.
    pub ring_page_order: u32,
    /// Queues wanted.
    pub queues: u32,
    /// Ask for persistent grants.
    pub persistent: bool,
    /// Layout to declare.
    pub protocol: Protocol,
}

/// The disk as the backend describes it at Connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskDescription {
    /// In 512-byte sectors.
    pub sectors: u64,
    /// `info` bits.
    pub info: u32,
    /// Logical sector size.
    pub sector_size: u32,
    /// Physical sector size.
    pub physical_sector_size: u32,
    /// `feature-flush-cache`.
    pub flush: bool,
    /// `feature-barrier`.
    pub barrier: bool,
    /// `feature-discard`.
    pub discard: bool,
    /// `feature-max-indirect-segments` (0 if absent).
    pub max_indirect_segments: u32,
    /// Persistent grants negotiated.
    pub persistent: bool,
}

/// A connected frontend: its queues and what it learned.
pub struct Connected {
    /// One per negotiated queue.
    pub queues: Vec<FrontQueue>,
    /// The disk.
    pub disk: DiskDescription,
}

/// Waits until the backend directory `dir` is in state `want`.
fn wait_state(
    xs: &dyn Xenstore,
    dir: &str,
    want: XenbusState,
    timeout: Duration,
) -> Result<(), FrontendError> {
    let started = Instant::now();
    let events = xs.events();
    loop {
        let state = read_state(xs, dir);
        if state == Some(want) {
            return Ok(());
        }
        // A backend that closes during the handshake (a detach, a failed connect) will not
        // come back to this handshake: give up now, as blkfront does, rather than time out.
        if matches!(state, Some(XenbusState::Closing | XenbusState::Closed)) {
            return Err(FrontendError::Setup(format!(
                "{dir}/state went {state:?} while waiting for {want:?}"
            )));
        }
        let left = timeout.checked_sub(started.elapsed()).ok_or_else(|| {
            FrontendError::Setup(format!(
                "{dir}/state stayed {state:?}, waiting for {want:?}"
            ))
        })?;
        let _ = events.recv_timeout(left.min(Duration::from_millis(200)));
    }
}

/// Which device: our directory, the backend's, and the backend's domain.
#[derive(Debug, Clone, Copy)]
pub struct Device<'a> {
    /// `/local/domain/<guest>/device/vbd/<id>`.
    pub frontend: &'a str,
    /// The backend's directory (the frontend's `backend` key).
    pub backend: &'a str,
    /// The backend's domain (grants go to it).
    pub backend_domid: u32,
}

/// Runs the handshake for `device`, placing ring pages from guest page `first_ring_page` on.
pub fn connect(
    xs: &dyn Xenstore,
    domain: &Arc<SimDomain>,
    device: Device<'_>,
    first_ring_page: usize,
    wishes: Wishes,
    timeout: Duration,
) -> Result<Connected, FrontendError> {
    let Device {
        frontend,
        backend,
        backend_domid,
    } = device;
    let token = format!("blkfront:{frontend}");
    xs.watch(&format!("{backend}/state"), &token)
        .map_err(|e| FrontendError::Setup(e.to_string()))?;
    wait_state(xs, backend, XenbusState::InitWait, timeout)?;
    let num = |key: &str| {
        read_u32(xs, NO_TX, &format!("{backend}/{key}"))
            .map_err(|e| FrontendError::Setup(e.to_string()))
    };
    let order = wishes
        .ring_page_order
        .min(num("max-ring-page-order")?.unwrap_or(0))
        .min(MAX_RING_PAGE_ORDER);
    let queues = wishes
        .queues
        .min(num("multi-queue-max-queues")?.unwrap_or(1))
        .max(1);
    let persistent = wishes.persistent && num(FEATURE_PERSISTENT)? == Some(1);

    let mut qs = Vec::new();
    for q in 0..queues as usize {
        let first = first_ring_page + q * (1 << order);
        qs.push(FrontQueue::new(
            domain.clone(),
            backend_domid,
            first,
            order,
            wishes.protocol,
            0,
        )?);
    }
    transaction(xs, |tx| {
        let w =
            |key: &str, value: String| xs.write(tx, &format!("{frontend}/{key}"), value.as_bytes());
        // A previous connection's rings (before a reboot or driver reload) must not linger:
        // the backend would read them as ours.
        for stale in xs.directory(tx, frontend)? {
            let ring_key = stale.starts_with("ring-ref") || stale.starts_with("queue-");
            let other = [
                "ring-page-order",
                "num-ring-pages",
                "multi-queue-num-queues",
                "event-channel",
            ];
            if ring_key || other.contains(&stale.as_str()) {
                xs.rm(tx, &format!("{frontend}/{stale}"))?;
            }
        }
        for (q, queue) in qs.iter().enumerate() {
            let prefix = if queues > 1 {
                format!("queue-{q}/")
            } else {
                String::new()
            };
            if order == 0 {
                w(
                    &format!("{prefix}ring-ref"),
                    queue.ring_grefs()[0].to_string(),
                )?;
            } else {
                for (i, g) in queue.ring_grefs().iter().enumerate() {
                    w(&format!("{prefix}ring-ref{i}"), g.to_string())?;
                }
            }
            w(&format!("{prefix}event-channel"), queue.port().to_string())?;
        }
        if order > 0 {
            w("ring-page-order", order.to_string())?;
        }
        if queues > 1 {
            w("multi-queue-num-queues", queues.to_string())?;
        }
        w("protocol", wishes.protocol.as_str().to_string())?;
        w(FEATURE_PERSISTENT, u32::from(persistent).to_string())?;
        w("state", XenbusState::Initialised.as_str().to_string())
    })
    .map_err(|e| FrontendError::Setup(e.to_string()))?;

    wait_state(xs, backend, XenbusState::Connected, timeout)?;
    let flag = |key: &str| -> Result<bool, FrontendError> { Ok(num(key)? == Some(1)) };
    let sectors = read_string(xs, NO_TX, &format!("{backend}/sectors"))
        .map_err(|e| FrontendError::Setup(e.to_string()))?
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| {
            FrontendError::Setup(format!("{backend}/sectors missing or not a number"))
        })?;
    let disk = DiskDescription {
        sectors,
        info: num("info")?.unwrap_or(0),
        sector_size: num("sector-size")?.unwrap_or(512),
        physical_sector_size: num("physical-sector-size")?.unwrap_or(512),
        flush: flag("feature-flush-cache")?,
        barrier: flag("feature-barrier")?,
        discard: flag("feature-discard")?,
        max_indirect_segments: num("feature-max-indirect-segments")?.unwrap_or(0),
        persistent,
    };
    write_state(xs, frontend, XenbusState::Connected)
        .map_err(|e| FrontendError::Setup(e.to_string()))?;
    let _ = xs.unwatch(&format!("{backend}/state"), &token);
    Ok(Connected { queues: qs, disk })
}
