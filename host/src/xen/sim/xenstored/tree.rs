//! The simulated xenstored's data: a tree of nodes with values and permissions.
//!
//! Paths are absolute (`/local/domain/3/name`); the root `/` always exists. A node created
//! implicitly (by a write below it) takes its parent's permissions, with the creating
//! domain as owner when that is not dom0 — as xenstored does.

use crate::xen::xenstore::{Access, Perm};
use std::collections::BTreeMap;

/// One node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// The value (may be empty).
    pub value: Vec<u8>,
    /// Owner first, then per-domain entries.
    pub perms: Vec<Perm>,
}

/// The whole tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    nodes: BTreeMap<String, Node>,
}

/// Why an operation failed, as xenstored's errno name.
pub type Errno = &'static str;

/// The parent of an absolute path (`None` for `/`).
pub fn parent(path: &str) -> Option<&str> {
    if path == "/" {
        return None;
    }
    match path.rfind('/') {
        Some(0) => Some("/"),
        Some(i) => Some(&path[..i]),
        None => None,
    }
}

/// True when `path` is `base` or below it.
pub fn is_at_or_below(path: &str, base: &str) -> bool {
    base == "/"
        || path == base
        || (path.starts_with(base) && path.as_bytes().get(base.len()) == Some(&b'/'))
}

/// Checks an absolute path: xenstore's character set and length limit.
pub fn valid_path(path: &str) -> bool {
    path.starts_with('/')
        && path.len() <= crate::xen::xenstore::wire::ABS_PATH_MAX
        && (path == "/" || !path.ends_with('/'))
        && !path.contains("//")
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-/_@".contains(&b))
}

/// May `domid` do `want` (Read or Write) on a node with `perms`?
pub fn allowed(perms: &[Perm], domid: u32, want: Access) -> bool {
    if domid == 0 {
        return true;
    }
    let Some(owner) = perms.first() else {
        return false;
    };
    if owner.domid == domid {
        return true;
    }
    let access = perms[1..]
        .iter()
        .find(|p| p.domid == domid)
        .map_or(owner.access, |p| p.access);
    match want {
        Access::Read => matches!(access, Access::Read | Access::Both),
        Access::Write => matches!(access, Access::Write | Access::Both),
        Access::Both => access == Access::Both,
        Access::None => true,
    }
}

impl Default for Tree {
    fn default() -> Self {
        let mut nodes = BTreeMap::new();
        nodes.insert(
            "/".to_string(),
            Node {
                value: Vec::new(),
                perms: vec![Perm {
                    domid: 0,
                    access: Access::None,
                }],
            },
        );
        Tree { nodes }
    }
}

impl Tree {
    /// The node at `path`.
    pub fn get(&self, path: &str) -> Option<&Node> {
        self.nodes.get(path)
    }

    /// The direct children's names.
    pub fn children(&self, path: &str) -> Vec<String> {
        let prefix = if path == "/" {
            "/".to_string()
        } else {
            format!("{path}/")
        };
        self.nodes
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter_map(|(k, _)| {
                let rest = &k[prefix.len()..];
                (!rest.is_empty() && !rest.contains('/')).then(|| rest.to_string())
            })
            .collect()
    }

    /// Reads a node as `domid`.
    pub fn read(&self, path: &str, domid: u32) -> Result<&Node, Errno> {
        let node = self.get(path).ok_or("ENOENT")?;
        if allowed(&node.perms, domid, Access::Read) {
            Ok(node)
        } else {
            Err("EACCES")
        }
    }

    /// Writes (creating the node and missing parents) as `domid`; returns the paths created
    /// or changed.
    pub fn write(&mut self, path: &str, value: &[u8], domid: u32) -> Result<Vec<String>, Errno> {
        let mut changed = self.create(path, domid)?;
        let node = self.nodes.get_mut(path).ok_or("ENOENT")?;
        if !allowed(&node.perms, domid, Access::Write) {
            return Err("EACCES");
        }
        node.value = value.to_vec();
        if !changed.iter().any(|p| p == path) {
            changed.push(path.to_string());
        }
        Ok(changed)
    }

    /// Creates `path` and its missing parents as `domid`; returns the created paths.
    pub fn create(&mut self, path: &str, domid: u32) -> Result<Vec<String>, Errno> {
        if self.nodes.contains_key(path) {
            return Ok(Vec::new());
        }
        let mut missing = vec![path];
        let mut at = path;
        let base = loop {
            let p = parent(at).ok_or("EINVAL")?;
            if let Some(node) = self.nodes.get(p) {
                break node;
            }
            missing.push(p);
            at = p;
        };
        if !allowed(&base.perms, domid, Access::Write) {
            return Err("EACCES");
        }
        let mut perms = base.perms.clone();
        if domid != 0 {
            perms[0].domid = domid;
        }
        let mut created = Vec::new();
        for p in missing.into_iter().rev() {
            self.nodes.insert(
                p.to_string(),
                Node {
                    value: Vec::new(),
                    perms: perms.clone(),
                },
            );
            created.push(p.to_string());
        }
        Ok(created)
    }

    /// Removes a node and everything below it as `domid`; returns the removed paths.
    pub fn remove(&mut self, path: &str, domid: u32) -> Result<Vec<String>, Errno> {
        if path == "/" {
            return Err("EINVAL");
        }
        let node = self.get(path).ok_or("ENOENT")?;
        if !allowed(&node.perms, domid, Access::Write) {
            return Err("EACCES");
        }
        let doomed: Vec<String> = self
            .nodes
            .keys()
            .filter(|k| is_at_or_below(k, path))
            .cloned()
            .collect();
        for k in &doomed {
            self.nodes.remove(k);
        }
        Ok(doomed)
    }

    /// Sets permissions as `domid` (who must own the node, unless dom0).
    pub fn set_perms(&mut self, path: &str, perms: Vec<Perm>, domid: u32) -> Result<(), Errno> {
        if perms.is_empty() {
            return Err("EINVAL");
        }
        let node = self.nodes.get_mut(path).ok_or("ENOENT")?;
        if domid != 0 && node.perms.first().map(|p| p.domid) != Some(domid) {
            return Err("EACCES");
        }
        node.perms = perms;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Perm {
        Perm::parse(s).unwrap()
    }

    #[test]
    fn paths() {
        assert_eq!(parent("/a/b"), Some("/a"));
        assert_eq!(parent("/a"), Some("/"));
        assert_eq!(parent("/"), None);
        assert!(
            is_at_or_below("/a/b", "/a")
                && !is_at_or_below("/ab", "/a")
                && is_at_or_below("/x", "/")
        );
        for good in ["/", "/local/domain/0", "/a-b_c@d"] {
            assert!(valid_path(good), "{good}");
        }
        for bad in ["", "a", "/a/", "//a", "/a b", "/a\0", "/ä"] {
            assert!(!valid_path(bad), "{bad:?}");
        }
    }

    #[test]
    fn writes_create_parents_that_inherit_permissions() {
        let mut t = Tree::default();
        t.write("/local/domain/3", b"", 0).unwrap();
        t.set_perms("/local/domain/3", vec![p("n3"), p("r0")], 0)
            .unwrap();
        // Domain 3 writes below its own directory; new nodes are its own.
        let created = t
            .write("/local/domain/3/device/vbd/51712/state", b"1", 3)
            .unwrap();
        assert_eq!(created.len(), 4);
        assert_eq!(
            t.get("/local/domain/3/device").unwrap().perms,
            vec![p("n3"), p("r0")]
        );
        // It may not write elsewhere, nor read what it was not given.
        assert_eq!(t.write("/local/domain/4/x", b"1", 3), Err("EACCES"));
        t.write("/secret", b"s", 0).unwrap();
        assert_eq!(t.read("/secret", 3).unwrap_err(), "EACCES");
        assert_eq!(t.read("/secret", 0).unwrap().value, b"s");
        assert_eq!(t.children("/local/domain/3"), vec!["device".to_string()]);
        assert_eq!(
            t.children("/"),
            vec!["local".to_string(), "secret".to_string()]
        );
        // Removal is recursive and needs write access.
        assert_eq!(t.remove("/local/domain/3", 4), Err("EACCES"));
        assert_eq!(t.remove("/local/domain/3/device", 3).unwrap().len(), 4);
        assert_eq!(t.remove("/", 0), Err("EINVAL"));
        // Only the owner changes permissions.
        t.write("/local/domain/3/x", b"", 3).unwrap();
        assert_eq!(
            t.set_perms("/local/domain/3/x", vec![p("n5")], 5),
            Err("EACCES")
        );
    }
}
