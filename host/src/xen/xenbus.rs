//! Xenbus device states, as both ends of a split driver write them into their `state`
//! nodes: the one place their numbers are spelled.

use super::xenstore::{Xenstore, XsError, NO_TX};

/// `XenbusState` values as written in xenstore (`io/xenbus.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XenbusState {
    /// 0: no state (or the node is gone).
    Unknown = 0,
    /// 1: being set up.
    Initialising = 1,
    /// 2: the backend waits for the frontend's ring details.
    InitWait = 2,
    /// 3: the frontend has published its rings.
    Initialised = 3,
    /// 4: connected.
    Connected = 4,
    /// 5: closing.
    Closing = 5,
    /// 6: closed.
    Closed = 6,
    /// 7: unused by blkif.
    Reconfiguring = 7,
    /// 8: unused by blkif.
    Reconfigured = 8,
}

impl XenbusState {
    /// Parses a state node's value (decimal, possibly with surrounding whitespace); anything
    /// else is `None` — a guest can write garbage there.
    pub fn parse(value: &[u8]) -> Option<XenbusState> {
        let text = std::str::from_utf8(value).ok()?.trim();
        if text.len() > 2 {
            return None;
        }
        Some(match text.parse::<u8>().ok()? {
            0 => XenbusState::Unknown,
            1 => XenbusState::Initialising,
            2 => XenbusState::InitWait,
            3 => XenbusState::Initialised,
            4 => XenbusState::Connected,
            5 => XenbusState::Closing,
            6 => XenbusState::Closed,
            7 => XenbusState::Reconfiguring,
            8 => XenbusState::Reconfigured,
            _ => return None,
        })
    }

    /// The value to write.
    pub fn as_str(self) -> &'static str {
        ["0", "1", "2", "3", "4", "5", "6", "7", "8"][self as usize]
    }
}

/// Writes `state` into `<dir>/state`.
pub fn write_state(xs: &dyn Xenstore, dir: &str, state: XenbusState) -> Result<(), XsError> {
    xs.write(NO_TX, &format!("{dir}/state"), state.as_str().as_bytes())
}

/// Reads `<dir>/state`: `None` when the node is missing or holds garbage.
pub fn read_state(xs: &dyn Xenstore, dir: &str) -> Option<XenbusState> {
    xs.read(NO_TX, &format!("{dir}/state"))
        .ok()
        .and_then(|v| XenbusState::parse(&v))
}
