//! Finding a guest by domid, name or UUID in xenstore, as `xl` lays domains out:
//! `/local/domain/<id>/name` and `/local/domain/<id>/vm` = `/vm/<uuid>`.

use super::disks_config::DomainRef;
use crate::xen::xenstore::{Xenstore, XsError, NO_TX};

/// Read-only access to xenstore for lookups: `read` is `Ok(None)` for an absent node.
pub trait XenstoreView {
    /// A node's value.
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, XsError>;
    /// A node's children.
    fn list(&self, path: &str) -> Result<Vec<String>, XsError>;
}

/// Why no single domain was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FindDomainError {
    /// No domain has that id, name or UUID.
    #[error("no domain {}", described(.0))]
    NotFound(DomainRef),
    /// Several domains have that name or UUID.
    #[error("{} domains match: {:?}; use a domid", .0.len(), .0)]
    Ambiguous(Vec<u32>),
    /// xenstore failed (the message names the path).
    #[error(transparent)]
    Xenstore(#[from] XsError),
}

/// "with id 3", "named web", "with UUID …".
fn described(domain: &DomainRef) -> String {
    match domain {
        DomainRef::Id(id) => format!("with id {id}"),
        DomainRef::Name(n) => format!("named {n}"),
        DomainRef::Uuid(u) => format!("with UUID {u}"),
    }
}

fn text(v: Option<Vec<u8>>) -> Option<String> {
    v.and_then(|b| String::from_utf8(b).ok())
        .map(|s| s.trim().to_string())
}

/// A xenstore connection seen as a [`XenstoreView`].
pub struct XsView<'a>(pub &'a dyn Xenstore);

impl XenstoreView for XsView<'_> {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, XsError> {
        match self.0.read(NO_TX, path) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is_enoent() => Ok(None),
            Err(e) => Err(e),
        }
    }
    fn list(&self, path: &str) -> Result<Vec<String>, XsError> {
        self.0.directory(NO_TX, path)
    }
}

/// The domid of `domain`, or an error saying what was not found.
pub fn find_domain(xs: &dyn XenstoreView, domain: &DomainRef) -> Result<u32, FindDomainError> {
    if let DomainRef::Id(id) = domain {
        return match xs.read(&format!("/local/domain/{id}/domid"))? {
            Some(_) => Ok(*id),
            None if xs
                .list(&format!("/local/domain/{id}"))
                .is_ok_and(|c| !c.is_empty()) =>
            {
                Ok(*id)
            }
            None => Err(FindDomainError::NotFound(domain.clone())),
        };
    }
    let mut matches = Vec::new();
    for entry in xs.list("/local/domain")? {
        let Ok(id) = entry.parse::<u32>() else {
            continue;
        };
        let hit = match domain {
            DomainRef::Name(name) => {
                text(xs.read(&format!("/local/domain/{id}/name"))?).as_deref() == Some(name)
            }
            DomainRef::Uuid(uuid) => {
                text(xs.read(&format!("/local/domain/{id}/vm"))?).is_some_and(|vm| {
                    vm.rsplit('/')
                        .next()
                        .is_some_and(|u| u.eq_ignore_ascii_case(uuid))
                })
            }
            DomainRef::Id(_) => unreachable!("handled above"),
        };
        if hit {
            matches.push(id);
        }
    }
    match matches.as_slice() {
        [id] => Ok(*id),
        [] => Err(FindDomainError::NotFound(domain.clone())),
        many => Err(FindDomainError::Ambiguous(many.to_vec())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    struct Tree(BTreeMap<String, String>);
    impl XenstoreView for Tree {
        fn read(&self, path: &str) -> Result<Option<Vec<u8>>, XsError> {
            Ok(self.0.get(path).map(|v| v.as_bytes().to_vec()))
        }
        fn list(&self, path: &str) -> Result<Vec<String>, XsError> {
            let prefix = format!("{path}/");
            let mut c: Vec<String> = self
                .0
                .keys()
                .filter_map(|k| k.strip_prefix(&prefix))
                .map(|rest| rest.split('/').next().unwrap().to_string())
                .collect();
            c.dedup();
            Ok(c)
        }
    }

    fn tree() -> Tree {
        Tree(
            [
                ("/local/domain/0/name", "Domain-0"),
                ("/local/domain/0/domid", "0"),
                ("/local/domain/3/name", "guest"),
                ("/local/domain/3/domid", "3"),
                (
                    "/local/domain/3/vm",
                    "/vm/6f9619ff-8b86-d011-b42d-00c04fc964ff",
                ),
                ("/local/domain/5/name", "twin"),
                ("/local/domain/6/name", "twin"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        )
    }

    #[test]
    fn by_id_name_and_uuid() {
        let t = tree();
        assert_eq!(find_domain(&t, &DomainRef::Id(3)), Ok(3));
        assert_eq!(find_domain(&t, &DomainRef::Id(5)), Ok(5));
        assert_eq!(find_domain(&t, &DomainRef::Name("guest".into())), Ok(3));
        assert_eq!(
            find_domain(
                &t,
                &DomainRef::Uuid("6F9619FF-8B86-D011-B42D-00C04FC964FF".into())
            ),
            Ok(3)
        );
        let message = |d: DomainRef| find_domain(&t, &d).unwrap_err().to_string();
        assert_eq!(message(DomainRef::Id(9)), "no domain with id 9");
        assert_eq!(
            message(DomainRef::Name("nope".into())),
            "no domain named nope"
        );
        assert_eq!(
            message(DomainRef::Uuid(
                "00000000-0000-0000-0000-000000000000".into()
            )),
            "no domain with UUID 00000000-0000-0000-0000-000000000000"
        );
        assert_eq!(
            find_domain(&t, &DomainRef::Name("twin".into())),
            Err(FindDomainError::Ambiguous(vec![5, 6]))
        );
        assert_eq!(
            message(DomainRef::Name("twin".into())),
            "2 domains match: [5, 6]; use a domid"
        );
    }
}
