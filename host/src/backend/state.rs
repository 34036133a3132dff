//! The xenbus state machine of one backend device, as a pure decision table.
//!
//! On every watch event the device re-reads the frontend's `state` and its own `online` and
//! asks [`next_action`] what to do; nothing is inferred from the event itself, because watch
//! events coalesce and fire spuriously (PROTOCOL.md §3.3, §4 items 1-2).

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

/// What the device should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing changed that matters.
    Wait,
    /// Read the frontend's rings, map them, publish the disk, go Connected.
    Connect,
    /// Switch to Closing (the frontend is closing, or we were asked to close).
    Close,
    /// Stop the rings, finish in-flight I/O, unmap, unbind, then write Closed.
    Disconnect,
    /// The frontend restarted after we closed: publish features again and go InitWait.
    Reinit,
    /// Tear down whatever is left and remove the device (online=0, or the frontend is gone).
    Remove,
}

/// Decides the next step from our state, the frontend's (`None` = its node is gone or holds
/// garbage) and the `online` key.
pub fn next_action(ours: XenbusState, frontend: Option<XenbusState>, online: bool) -> Action {
    use XenbusState::*;
    let Some(fe) = frontend else {
        return Action::Remove;
    };
    match (ours, fe) {
        (_, Unknown) => Action::Remove,
        // Rings published (3) or already connected (4, a coalesced event): connect once.
        (InitWait, Initialised | Connected) => Action::Connect,
        (Connected, Initialised | Connected) => Action::Wait,
        (Closing | Closed, Initialised | Connected) => Action::Wait,
        (Connected | InitWait, Closing) => Action::Close,
        (Closing, Closing) => Action::Wait,
        (Closed, Closed | Closing) if !online => Action::Remove,
        (Closed, Closed | Closing) => Action::Wait,
        (_, Closed) => Action::Disconnect,
        // The frontend started over (driver reload, reboot): reconnect if still wanted.
        (Closed, Initialising | InitWait) if online => Action::Reinit,
        (Closed, Initialising | InitWait) => Action::Remove,
        (Connected | Closing, Initialising) => Action::Disconnect,
        _ => Action::Wait,
    }
}

#[cfg(test)]
mod tests {
    use super::XenbusState::*;
    use super::*;

    #[test]
    fn states_parse_strictly() {
        assert_eq!(XenbusState::parse(b"4"), Some(Connected));
        assert_eq!(XenbusState::parse(b" 6\n"), Some(Closed));
        for bad in [&b""[..], b"9", b"-1", b"004", b"x", b"\xff"] {
            assert_eq!(XenbusState::parse(bad), None);
        }
        assert_eq!(Closing.as_str(), "5");
    }

    #[test]
    fn the_lifecycle_of_a_device() {
        let t = |ours, fe, online| next_action(ours, fe, online);
        // Handshake: 3 and 4 alike.
        assert_eq!(t(InitWait, Some(Initialising), true), Action::Wait);
        assert_eq!(t(InitWait, Some(Initialised), true), Action::Connect);
        assert_eq!(t(InitWait, Some(Connected), true), Action::Connect);
        assert_eq!(t(Connected, Some(Connected), true), Action::Wait);
        // Frontend closes.
        assert_eq!(t(Connected, Some(Closing), true), Action::Close);
        assert_eq!(t(Closing, Some(Closed), true), Action::Disconnect);
        assert_eq!(t(Connected, Some(Closed), true), Action::Disconnect);
        // Reconnect after a guest reboot / driver reload.
        assert_eq!(t(Closed, Some(Initialising), true), Action::Reinit);
        assert_eq!(t(Connected, Some(Initialising), true), Action::Disconnect);
        // Hot-unplug: online=0.
        assert_eq!(t(Closed, Some(Closed), false), Action::Remove);
        assert_eq!(t(Closed, Some(Initialising), false), Action::Remove);
        // Frontend gone or garbage.
        assert_eq!(t(Connected, None, true), Action::Remove);
        assert_eq!(t(InitWait, Some(Unknown), true), Action::Remove);
    }
}
