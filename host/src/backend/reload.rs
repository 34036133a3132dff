//! What a changed `disks.toml` means for the disks being served (SIGHUP): the pure matching
//! step, testable alone; [`super::server`] carries the plan out.
//!
//! A disk is known by its identity, the guest and the guest's device: `(domain, vbd)`, where
//! a disk listed without `vbd` is known by the device it was attached as. Never by its
//! position in the file: deleting one entry must not shift the others onto each other's
//! images.
//!
//! ```text
//!  entry with vbd ──────▶ the running disk of that domain at that vbd (configured or attached)
//!  entry without vbd ───▶ a running disk with exactly the same entry, else
//!                         the one unmatched running disk of that domain, if it is the only one
//!  nothing matched ─────▶ a new disk;   running disk left unmatched ─▶ detached
//! ```
//!
//! When a domain has several unmatched disks and unmatched entries without `vbd`, nothing
//! says which is which: the plan leaves those disks as they are and says so
//! ([`Change::Ambiguous`]) rather than guess and swap a guest's disk for another's image.

use super::disks_config::{DiskSpec, DomainRef};
use super::vbd::Vbd;

/// A disk being served, as the planner sees it.
#[derive(Debug, Clone, Copy)]
pub struct Running<'a> {
    /// The server's handle for it (stable across reloads).
    pub key: u64,
    /// Its entry as last applied.
    pub spec: &'a DiskSpec,
    /// The guest device it is attached as, if attached.
    pub attached: Option<Vbd>,
}

impl Running<'_> {
    /// The vbd that identifies it: configured, else the one it was attached as.
    fn vbd(&self) -> Option<Vbd> {
        self.spec.vbd.or(self.attached)
    }
}

/// What to do with one disk; `entry` is the entry's index in the new file.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// The entry is the same (or differs only by naming the vbd it already has).
    Keep { key: u64, entry: usize },
    /// Same disk, new plugin or plugin configuration: swap it in under the guest.
    Swap {
        key: u64,
        entry: usize,
        spec: DiskSpec,
    },
    /// Same disk, but a setting that only a detach can change (readonly, sector size...).
    NeedsDetach {
        key: u64,
        entry: usize,
        spec: DiskSpec,
    },
    /// A new entry: open it and attach it when its domain exists.
    Add { entry: usize, spec: DiskSpec },
    /// No longer listed: detach it.
    Remove { key: u64 },
    /// A domain whose changed disks cannot be told apart: `keys` stay as they are and
    /// `entries` new entries are not added.
    Ambiguous {
        domain: DomainRef,
        keys: Vec<u64>,
        entries: usize,
    },
}

/// Matches the new entries to the running disks by identity (see the module doc).
pub fn plan(running: &[Running<'_>], entries: Vec<DiskSpec>) -> Vec<Change> {
    let mut taken = vec![false; running.len()];
    let mut matched: Vec<Option<usize>> = vec![None; entries.len()];
    // Entries that name their vbd: the running disk at that vbd of that domain.
    for (e, spec) in entries.iter().enumerate() {
        let Some(v) = spec.vbd else { continue };
        if let Some(r) = (0..running.len()).find(|&r| {
            !taken[r] && running[r].spec.domain == spec.domain && running[r].vbd() == Some(v)
        }) {
            taken[r] = true;
            matched[e] = Some(r);
        }
    }
    // Entries without vbd: an identical running entry first.
    for (e, spec) in entries.iter().enumerate() {
        if spec.vbd.is_some() || matched[e].is_some() {
            continue;
        }
        if let Some(r) = (0..running.len()).find(|&r| !taken[r] && running[r].spec == spec) {
            taken[r] = true;
            matched[e] = Some(r);
        }
    }
    // Then, per domain, a changed entry pairs with the domain's one unmatched disk only when
    // neither side has another candidate.
    let mut changes = Vec::new();
    let mut decided = vec![false; entries.len()];
    for e in 0..entries.len() {
        if entries[e].vbd.is_some() || matched[e].is_some() || decided[e] {
            continue;
        }
        let domain = &entries[e].domain;
        let new: Vec<usize> = (0..entries.len())
            .filter(|&x| {
                entries[x].vbd.is_none() && matched[x].is_none() && entries[x].domain == *domain
            })
            .collect();
        let old: Vec<usize> = (0..running.len())
            .filter(|&r| !taken[r] && running[r].spec.domain == *domain)
            .collect();
        for &x in &new {
            decided[x] = true;
        }
        match (old.as_slice(), new.as_slice()) {
            ([], _) => {}
            ([r], [x]) => {
                taken[*r] = true;
                matched[*x] = Some(*r);
            }
            _ => {
                for &r in &old {
                    taken[r] = true;
                }
                for &x in &new {
                    // Neither added nor matched: marked so the pass below skips it.
                    matched[x] = Some(usize::MAX);
                }
                changes.push(Change::Ambiguous {
                    domain: domain.clone(),
                    keys: old.iter().map(|&r| running[r].key).collect(),
                    entries: new.len(),
                });
            }
        }
    }
    for (e, spec) in entries.into_iter().enumerate() {
        match matched[e] {
            None => changes.push(Change::Add { entry: e, spec }),
            Some(usize::MAX) => {}
            Some(r) => changes.push(compare(&running[r], e, spec)),
        }
    }
    for (r, disk) in running.iter().enumerate() {
        if !taken[r] {
            changes.push(Change::Remove { key: disk.key });
        }
    }
    changes
}

/// A matched pair: what changed.
fn compare(old: &Running<'_>, entry: usize, spec: DiskSpec) -> Change {
    let key = old.key;
    let o = old.spec;
    let same_vbd = spec.vbd.is_none() || spec.vbd == old.vbd();
    let rest_same = same_vbd
        && (o.readonly, o.sector_size, o.queues, o.answer_on_completion)
            == (
                spec.readonly,
                spec.sector_size,
                spec.queues,
                spec.answer_on_completion,
            );
    if !rest_same {
        Change::NeedsDetach { key, entry, spec }
    } else if o.plugin == spec.plugin && o.plugin_config == spec.plugin_config {
        Change::Keep { key, entry }
    } else {
        Change::Swap { key, entry, spec }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xen_disk_plugin_api::Config;

    fn disk(domain: &str, path: &str) -> DiskSpec {
        DiskSpec {
            domain: DomainRef::parse(domain).unwrap(),
            plugin: "file".into(),
            readonly: false,
            sector_size: None,
            queues: None,
            vbd: None,
            answer_on_completion: None,
            limits: Default::default(),
            plugin_config: Config::from_pairs(&[format!("path={path}")]).unwrap(),
        }
    }

    fn at(mut d: DiskSpec, vbd: &str) -> DiskSpec {
        d.vbd = Vbd::parse(vbd);
        d
    }

    fn running<'a>(specs: &'a [(DiskSpec, Option<&'a str>)]) -> Vec<Running<'a>> {
        specs
            .iter()
            .enumerate()
            .map(|(i, (spec, attached))| Running {
                key: 10 + i as u64,
                spec,
                attached: attached.and_then(Vbd::parse),
            })
            .collect()
    }

    #[test]
    fn deleting_an_entry_removes_that_disk_only() {
        // The report: g1 (64M), g2, g3, g1 (512M); g2's entry deleted.
        let old = [
            (disk("g1", "/a64"), Some("xvdb")),
            (disk("g2", "/b"), Some("xvdb")),
            (disk("g3", "/c"), Some("xvdb")),
            (disk("g1", "/a512"), Some("xvdc")),
        ];
        let new = vec![disk("g1", "/a64"), disk("g3", "/c"), disk("g1", "/a512")];
        assert_eq!(
            plan(&running(&old), new),
            vec![
                Change::Keep { key: 10, entry: 0 },
                Change::Keep { key: 12, entry: 1 },
                Change::Keep { key: 13, entry: 2 },
                Change::Remove { key: 11 },
            ]
        );
    }

    #[test]
    fn deleting_the_first_of_two_disks_of_a_guest_never_swaps_the_second_in() {
        let old = [
            (disk("g1", "/ga"), Some("xvdb")),
            (disk("g1", "/gb"), Some("xvdc")),
        ];
        assert_eq!(
            plan(&running(&old), vec![disk("g1", "/gb")]),
            vec![
                Change::Keep { key: 11, entry: 0 },
                Change::Remove { key: 10 }
            ]
        );
    }

    #[test]
    fn a_changed_entry_is_swapped_when_it_can_only_be_that_disk() {
        let old = [
            (disk("g1", "/ga"), Some("xvdb")),
            (disk("g1", "/gb"), Some("xvdc")),
            (disk("g2", "/x"), None),
        ];
        let new = vec![disk("g1", "/ga"), disk("g1", "/gc"), disk("g2", "/y")];
        assert_eq!(
            plan(&running(&old), new),
            vec![
                Change::Keep { key: 10, entry: 0 },
                Change::Swap {
                    key: 11,
                    entry: 1,
                    spec: disk("g1", "/gc")
                },
                Change::Swap {
                    key: 12,
                    entry: 2,
                    spec: disk("g2", "/y")
                },
            ]
        );
    }

    #[test]
    fn two_changed_entries_of_one_guest_are_not_guessed() {
        let old = [
            (disk("g1", "/ga"), Some("xvdb")),
            (disk("g1", "/gb"), Some("xvdc")),
        ];
        let new = vec![disk("g1", "/gc"), disk("g1", "/gd")];
        assert_eq!(
            plan(&running(&old), new),
            vec![Change::Ambiguous {
                domain: DomainRef::Name("g1".into()),
                keys: vec![10, 11],
                entries: 2
            }]
        );
    }

    #[test]
    fn a_vbd_matches_the_configured_or_the_attached_device() {
        let old = [
            (disk("g1", "/ga"), Some("xvdb")),
            (at(disk("g1", "/gb"), "xvdc"), None),
        ];
        // Naming the vbd a disk already has changes nothing; a new path at a named vbd is
        // a swap of that disk, whatever the order of the entries.
        let new = vec![at(disk("g1", "/gz"), "xvdc"), at(disk("g1", "/ga"), "xvdb")];
        assert_eq!(
            plan(&running(&old), new),
            vec![
                Change::Swap {
                    key: 11,
                    entry: 0,
                    spec: at(disk("g1", "/gz"), "xvdc")
                },
                Change::Keep { key: 10, entry: 1 },
            ]
        );
        // Another vbd is another disk: the old one goes, the new one comes.
        let new = vec![at(disk("g1", "/ga"), "xvdd"), at(disk("g1", "/gb"), "xvdc")];
        assert_eq!(
            plan(&running(&old), new),
            vec![
                Change::Add {
                    entry: 0,
                    spec: at(disk("g1", "/ga"), "xvdd")
                },
                Change::Keep { key: 11, entry: 1 },
                Change::Remove { key: 10 },
            ]
        );
    }

    #[test]
    fn settings_outside_the_plugin_need_a_detach() {
        let old = [(disk("g1", "/ga"), Some("xvdb"))];
        let mut ro = disk("g1", "/ga");
        ro.readonly = true;
        assert_eq!(
            plan(&running(&old), vec![ro.clone()]),
            vec![Change::NeedsDetach {
                key: 10,
                entry: 0,
                spec: ro
            }]
        );
    }

    #[test]
    fn new_entries_and_new_domains_are_added() {
        let old = [(disk("g1", "/ga"), Some("xvdb"))];
        let new = vec![disk("g1", "/ga"), disk("g2", "/n"), disk("g1", "/gb")];
        assert_eq!(
            plan(&running(&old), new),
            vec![
                Change::Keep { key: 10, entry: 0 },
                Change::Add {
                    entry: 1,
                    spec: disk("g2", "/n")
                },
                Change::Add {
                    entry: 2,
                    spec: disk("g1", "/gb")
                },
            ]
        );
    }
}
