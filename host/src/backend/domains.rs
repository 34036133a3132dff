//! Finding a guest by domid, name or UUID in xenstore, as `xl` lays domains out:
//! `/local/domain/<id>/name` and `/local/domain/<id>/vm` = `/vm/<uuid>`.

use super::disks_config::DomainRef;

/// Read-only access to xenstore for lookups: `read` is `Ok(None)` for an absent node.
pub trait XenstoreView {
    /// A node's value.
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, String>;
    /// A node's children.
    fn list(&self, path: &str) -> Result<Vec<String>, String>;
}

fn text(v: Option<Vec<u8>>) -> Option<String> {
    v.and_then(|b| String::from_utf8(b).ok())
        .map(|s| s.trim().to_string())
}

/// A xenstore connection seen as a [`XenstoreView`].
pub struct XsView<'a>(pub &'a dyn crate::xen::xenstore::Xenstore);

impl XenstoreView for XsView<'_> {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, String> {
        match self.0.read(crate::xen::xenstore::NO_TX, path) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is_enoent() => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }
    fn list(&self, path: &str) -> Result<Vec<String>, String> {
        self.0
            .directory(crate::xen::xenstore::NO_TX, path)
            .map_err(|e| e.to_string())
    }
}

/// The domid of `domain`, or an error saying what was not found.
pub fn find_domain(xs: &dyn XenstoreView, domain: &DomainRef) -> Result<u32, String> {
    if let DomainRef::Id(id) = domain {
        return match xs.read(&format!("/local/domain/{id}/domid"))? {
            Some(_) => Ok(*id),
            None if xs
                .list(&format!("/local/domain/{id}"))
                .is_ok_and(|c| !c.is_empty()) =>
            {
                Ok(*id)
            }
            None => Err(format!("no domain with id {id}")),
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
    match (matches.as_slice(), domain) {
        ([id], _) => Ok(*id),
        ([], DomainRef::Name(n)) => Err(format!("no domain named {n}")),
        ([], DomainRef::Uuid(u)) => Err(format!("no domain with UUID {u}")),
        (many, _) => Err(format!(
            "{} domains match: {many:?}; use a domid",
            many.len()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    struct Tree(BTreeMap<String, String>);
    impl XenstoreView for Tree {
        fn read(&self, path: &str) -> Result<Option<Vec<u8>>, String> {
            Ok(self.0.get(path).map(|v| v.as_bytes().to_vec()))
        }
        fn list(&self, path: &str) -> Result<Vec<String>, String> {
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
        assert!(find_domain(&t, &DomainRef::Id(9))
            .unwrap_err()
            .contains("no domain with id 9"));
        assert!(find_domain(&t, &DomainRef::Name("nope".into()))
            .unwrap_err()
            .contains("no domain named nope"));
        assert!(find_domain(&t, &DomainRef::Name("twin".into()))
            .unwrap_err()
            .contains("2 domains match"));
    }
}
