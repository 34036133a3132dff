//! The host's top-level modules use each other in one direction only (the graph in
//! `lib.rs`'s docs): a `use` that closes a cycle fails here, naming it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Which top-level module uses which, from `crate::<name>` paths in code (comments and
/// doc text left out).
fn edges(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    sources(src, &mut files);
    let top = |p: &Path| -> Option<String> {
        let rel = p.strip_prefix(src).ok()?;
        let first = rel.components().next()?.as_os_str().to_str()?.to_string();
        Some(first.trim_end_matches(".rs").to_string())
    };
    let modules: BTreeSet<String> = files.iter().filter_map(|p| top(p)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let Some(from) = top(f) else { continue };
        if from == "lib" || from == "main" {
            continue;
        }
        for line in std::fs::read_to_string(f).unwrap().lines() {
            let code = line.split("//").next().unwrap_or("");
            for (i, _) in code.match_indices("crate::") {
                let name: String = code[i + 7..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if name != from && modules.contains(&name) {
                    graph.entry(from.clone()).or_default().insert(name);
                }
            }
        }
    }
    graph
}

/// A cycle through `node`, if any (depth-first, path kept).
fn cycle(
    graph: &BTreeMap<String, BTreeSet<String>>,
    node: &str,
    path: &mut Vec<String>,
) -> Option<Vec<String>> {
    if let Some(i) = path.iter().position(|n| n == node) {
        let mut c = path[i..].to_vec();
        c.push(node.to_string());
        return Some(c);
    }
    path.push(node.to_string());
    for next in graph.get(node).into_iter().flatten() {
        if let Some(c) = cycle(graph, next, path) {
            return Some(c);
        }
    }
    path.pop();
    None
}

#[test]
fn top_level_modules_form_no_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = edges(&src);
    assert!(
        graph.get("backend").is_some_and(|d| d.contains("blkif")),
        "the scan found no edges: {graph:?}"
    );
    for node in graph.keys() {
        if let Some(c) = cycle(&graph, node, &mut Vec::new()) {
            panic!("modules use each other in a cycle: {}", c.join(" -> "));
        }
    }
    for leaf in ["blkif", "xen", "histogram", "rng"] {
        assert!(
            graph.get(leaf).is_none_or(|d| d.is_empty()),
            "{leaf} is documented as a leaf but uses {:?}",
            graph[leaf]
        );
    }
}
