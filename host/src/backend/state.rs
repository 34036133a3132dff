//! The xenbus state machine of one backend device, as a pure decision table.
//!
//! On every watch event the device re-reads the frontend's `state` and its own `online` and
//! asks [`next_action`] what to do; nothing is inferred from the event itself, because watch
//! events coalesce and fire spuriously (`docs/protocol.md#handshake`, `#backend-rules`).

pub use crate::xen::xenbus::XenbusState;

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
