//! Reading what the frontend published when it reached Initialised: ring references, ring
//! order, queues, event channels, protocol, persistent grants. All of it is guest-written
//! and hostile: every value is bounded and parsed strictly, and an error names the key.

use super::features::HostOffer;
use crate::blkif::keys::FEATURE_PERSISTENT;
use crate::xen::xenstore::XsError;

/// One queue's ring pages and event channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueRing {
    /// Grant references of the ring pages, in order (2^order of them).
    pub ring_refs: Vec<u32>,
    /// The frontend's event channel port.
    pub event_channel: u32,
}

/// Everything the backend needs to attach to the frontend's rings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontendRings {
    /// log2 of pages per ring.
    pub ring_page_order: u32,
    /// One entry per queue.
    pub queues: Vec<QueueRing>,
    /// The `protocol` value, if written (policy for absence is the caller's).
    pub protocol: Option<String>,
    /// Persistent grants negotiated (we offered and the frontend asked).
    pub persistent: bool,
}

/// Reads one key under the frontend's directory: `Ok(None)` when absent.
pub type Reader<'a> = dyn Fn(&str) -> Result<Option<Vec<u8>>, XsError> + 'a;

/// What is wrong with what the frontend published: each case names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrontendKeyError {
    /// xenstore failed to read it.
    #[error("frontend key {key}: {source}")]
    Read {
        /// The key.
        key: String,
        /// What xenstore said.
        #[source]
        source: XsError,
    },
    /// A required key is absent.
    #[error("frontend key {key} is missing")]
    Missing {
        /// The key.
        key: String,
    },
    /// Not UTF-8.
    #[error("frontend key {key}: not text")]
    NotText {
        /// The key.
        key: String,
    },
    /// Not a decimal number.
    #[error("frontend key {key}: `{}` is not a number", value.escape_debug())]
    NotNumber {
        /// The key.
        key: String,
        /// What it holds.
        value: String,
    },
    /// A number, but outside what the key allows (`rule` says what it must be).
    #[error("frontend key {key}: {value} {rule}")]
    Outside {
        /// The key.
        key: String,
        /// What it holds, as written.
        value: String,
        /// What it must be, in words.
        rule: String,
    },
}

/// The longest value we accept for a number (u32 has 10 digits).
const MAX_NUMBER_LEN: usize = 10;

fn read_key(read: &Reader<'_>, key: &str) -> Result<Option<Vec<u8>>, FrontendKeyError> {
    read(key).map_err(|source| FrontendKeyError::Read {
        key: key.to_string(),
        source,
    })
}

fn text(key: &str, v: &[u8]) -> Result<String, FrontendKeyError> {
    let s = std::str::from_utf8(v).map_err(|_| FrontendKeyError::NotText {
        key: key.to_string(),
    })?;
    Ok(s.trim().to_string())
}

fn number(key: &str, v: &[u8]) -> Result<u32, FrontendKeyError> {
    let s = text(key, v)?;
    if s.is_empty() || s.len() > MAX_NUMBER_LEN || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(FrontendKeyError::NotNumber {
            key: key.to_string(),
            value: s,
        });
    }
    s.parse::<u32>()
        .map_err(|_| outside(key, s, "is out of range"))
}

fn outside(key: &str, value: impl ToString, rule: impl Into<String>) -> FrontendKeyError {
    FrontendKeyError::Outside {
        key: key.to_string(),
        value: value.to_string(),
        rule: rule.into(),
    }
}

fn required(read: &Reader<'_>, key: &str) -> Result<u32, FrontendKeyError> {
    match read_key(read, key)? {
        Some(v) => number(key, &v),
        None => Err(FrontendKeyError::Missing {
            key: key.to_string(),
        }),
    }
}

fn optional(read: &Reader<'_>, key: &str) -> Result<Option<u32>, FrontendKeyError> {
    read_key(read, key)?.map(|v| number(key, &v)).transpose()
}

fn queue_ring(
    read: &Reader<'_>,
    prefix: &str,
    order: u32,
    single_key: bool,
) -> Result<QueueRing, FrontendKeyError> {
    let ring_refs = if single_key {
        vec![required(read, &format!("{prefix}ring-ref"))?]
    } else if order == 0 {
        // Neither spelling of a one-page ring's reference: name the classic key.
        match optional(read, &format!("{prefix}ring-ref0"))? {
            Some(r) => vec![r],
            None => {
                return Err(FrontendKeyError::Missing {
                    key: format!("{prefix}ring-ref"),
                })
            }
        }
    } else {
        (0..1u32 << order)
            .map(|i| required(read, &format!("{prefix}ring-ref{i}")))
            .collect::<Result<_, _>>()?
    };
    let event_channel = required(read, &format!("{prefix}event-channel"))?;
    Ok(QueueRing {
        ring_refs,
        event_channel,
    })
}

/// Reads and checks the frontend's ring description.
/// `ad` is what the backend offered before InitWait: the frontend must stay within it.
pub fn read_frontend(read: &Reader<'_>, ad: &HostOffer) -> Result<FrontendRings, FrontendKeyError> {
    let order = match (
        optional(read, "ring-page-order")?,
        optional(read, "num-ring-pages")?,
    ) {
        (Some(o), _) => o,
        // Legacy spelling: a page count, which must be a power of two.
        (None, Some(n)) if n.is_power_of_two() => n.trailing_zeros(),
        (None, Some(n)) => return Err(outside("num-ring-pages", n, "is not a power of two")),
        (None, None) => 0,
    };
    if order > ad.max_ring_page_order {
        return Err(outside(
            "ring-page-order",
            order,
            format!("is above the advertised maximum {}", ad.max_ring_page_order),
        ));
    }
    // A one-page ring may use `ring-ref` (the original key) or `ring-ref0`.
    let single_key = |prefix: &str| -> Result<bool, FrontendKeyError> {
        Ok(order == 0 && read_key(read, &format!("{prefix}ring-ref"))?.is_some())
    };
    let queues = match optional(read, "multi-queue-num-queues")? {
        None => vec![queue_ring(read, "", order, single_key("")?)?],
        Some(n) if n == 0 || n > ad.max_queues => {
            return Err(outside(
                "multi-queue-num-queues",
                n,
                format!("is outside 1..={}", ad.max_queues),
            ))
        }
        Some(n) => (0..n)
            .map(|q| {
                let prefix = format!("queue-{q}/");
                queue_ring(read, &prefix, order, single_key(&prefix)?)
            })
            .collect::<Result<_, _>>()?,
    };
    let protocol = read_key(read, "protocol")?
        .map(|v| text("protocol", &v))
        .transpose()?;
    let persistent = match read_key(read, FEATURE_PERSISTENT)? {
        None => false,
        Some(v) => match text(FEATURE_PERSISTENT, &v)?.as_str() {
            "0" => false,
            "1" => true,
            other => {
                return Err(outside(
                    FEATURE_PERSISTENT,
                    format!("`{}`", other.escape_debug()),
                    "is not 0 or 1",
                ))
            }
        },
    } && ad.persistent;
    Ok(FrontendRings {
        ring_page_order: order,
        queues,
        protocol,
        persistent,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const AD: HostOffer = HostOffer {
        max_ring_page_order: 4,
        max_queues: 2,
        max_indirect_segments: 256,
        persistent: true,
    };

    fn read_from(keys: &[(&str, &str)]) -> Result<FrontendRings, FrontendKeyError> {
        let map: HashMap<String, Vec<u8>> = keys
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect();
        read_frontend(&|k: &str| Ok(map.get(k).cloned()), &AD)
    }

    #[test]
    fn single_page_single_queue() {
        let r = read_from(&[
            ("ring-ref", "8"),
            ("event-channel", "5"),
            ("protocol", "x86_64-abi"),
        ])
        .unwrap();
        assert_eq!(r.ring_page_order, 0);
        assert_eq!(
            r.queues,
            vec![QueueRing {
                ring_refs: vec![8],
                event_channel: 5
            }]
        );
        assert_eq!(r.protocol.as_deref(), Some("x86_64-abi"));
        assert!(!r.persistent);
    }

    #[test]
    fn multi_page_multi_queue_persistent() {
        let r = read_from(&[
            ("ring-page-order", "1"),
            ("multi-queue-num-queues", "2"),
            ("queue-0/ring-ref0", "10"),
            ("queue-0/ring-ref1", "11"),
            ("queue-0/event-channel", "7"),
            ("queue-1/ring-ref0", "12"),
            ("queue-1/ring-ref1", "13"),
            ("queue-1/event-channel", "8"),
            ("feature-persistent", "1"),
        ])
        .unwrap();
        assert_eq!(r.queues.len(), 2);
        assert_eq!(
            r.queues[1],
            QueueRing {
                ring_refs: vec![12, 13],
                event_channel: 8
            }
        );
        assert!(r.persistent);
    }

    #[test]
    fn hostile_values_are_refused_naming_the_key() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("event-channel", "5")], "ring-ref is missing"),
            (&[("ring-ref", "x"), ("event-channel", "5")], "ring-ref"),
            (
                &[("ring-ref", "99999999999"), ("event-channel", "5")],
                "ring-ref",
            ),
            (&[("ring-ref", "-1"), ("event-channel", "5")], "ring-ref"),
            (&[("ring-ref", "1")], "event-channel is missing"),
            (
                &[
                    ("ring-page-order", "5"),
                    ("ring-ref0", "1"),
                    ("event-channel", "5"),
                ],
                "ring-page-order",
            ),
            (
                &[
                    ("ring-page-order", "1"),
                    ("ring-ref0", "1"),
                    ("event-channel", "5"),
                ],
                "ring-ref1 is missing",
            ),
            (
                &[
                    ("num-ring-pages", "3"),
                    ("ring-ref", "1"),
                    ("event-channel", "5"),
                ],
                "num-ring-pages",
            ),
            (&[("multi-queue-num-queues", "0")], "multi-queue-num-queues"),
            (&[("multi-queue-num-queues", "3")], "multi-queue-num-queues"),
            (
                &[
                    ("multi-queue-num-queues", "2"),
                    ("queue-0/ring-ref", "1"),
                    ("queue-0/event-channel", "2"),
                ],
                "queue-1/",
            ),
            (
                &[
                    ("ring-ref", "1"),
                    ("event-channel", "5"),
                    ("feature-persistent", "yes"),
                ],
                "feature-persistent",
            ),
        ];
        for (keys, needle) in cases {
            let e = read_from(keys).unwrap_err().to_string();
            assert!(e.contains(needle), "{keys:?}: {e}");
        }
        let bad_utf8 =
            read_frontend(&|k: &str| Ok((k == "ring-ref").then(|| vec![0xff])), &AD).unwrap_err();
        assert_eq!(
            bad_utf8,
            FrontendKeyError::NotText {
                key: "ring-ref".into()
            }
        );
    }

    #[test]
    fn a_xenstore_failure_names_the_key_it_was_reading() {
        let e = read_frontend(&|_: &str| Err(XsError::Io("gone".into())), &AD).unwrap_err();
        assert_eq!(
            e,
            FrontendKeyError::Read {
                key: "ring-page-order".into(),
                source: XsError::Io("gone".into())
            }
        );
        assert_eq!(
            e.to_string(),
            "frontend key ring-page-order: xenstore connection: gone"
        );
    }

    #[test]
    fn persistent_needs_both_sides() {
        let map: HashMap<&str, &str> = [
            ("ring-ref", "1"),
            ("event-channel", "2"),
            ("feature-persistent", "1"),
        ]
        .into();
        let read = |k: &str| Ok(map.get(k).map(|v| v.as_bytes().to_vec()));
        let ad = HostOffer {
            persistent: false,
            ..AD
        };
        assert!(!read_frontend(&read, &ad).unwrap().persistent);
    }
}
