//! Every backend crate has the skeleton ADDING_A_BACKEND.md describes: the
//! same files with the same roles, its extra files named in its crate doc,
//! and no two of its modules importing each other.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const BACKENDS: [&str; 3] = ["backend-memory", "backend-rabbitmq", "backend-nats"];

const SKELETON: [&str; 10] = [
    "lib.rs",
    "config.rs",
    "connection.rs",
    "topology.rs",
    "headers.rs",
    "publish.rs",
    "subscription.rs",
    "dead_letters.rs",
    "error.rs",
    "broker.rs",
];

fn src(backend: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(backend)
        .join("src")
}

fn modules(backend: &str) -> BTreeMap<String, String> {
    std::fs::read_dir(src(backend))
        .unwrap_or_else(|e| panic!("{backend}: {e}"))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "rs"))
        .map(|path| {
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&path).unwrap())
        })
        .collect()
}

/// The crate modules a file imports (`use crate::x`, `crate::x::y`, and
/// `use crate::{x, y}`).
fn imports(source: &str, known: &BTreeSet<String>) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (i, _) in source.match_indices("crate::") {
        let rest = &source[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            for item in group.split(',') {
                let name = item.trim().split("::").next().unwrap_or("").trim();
                if known.contains(name) {
                    found.insert(name.to_owned());
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if known.contains(&name) {
                found.insert(name);
            }
        }
    }
    found
}

/// A cycle in the import graph, if there is one.
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut found = path[at..].to_vec();
            found.push(node.to_owned());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, graph, path, done) {
                return Some(found);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn every_backend_has_the_skeleton_and_documents_its_extras() {
    for backend in BACKENDS {
        let modules = modules(backend);
        for file in SKELETON {
            let name = file.trim_end_matches(".rs");
            assert!(modules.contains_key(name), "{backend} has no {file}");
        }
        let lib = &modules["lib"];
        for extra in modules
            .keys()
            .filter(|m| !SKELETON.contains(&format!("{m}.rs").as_str()))
        {
            assert!(
                lib.contains(&format!("`{extra}.rs`")),
                "{backend}: the crate doc does not name its extra file {extra}.rs"
            );
        }
    }
}

#[test]
fn no_backend_module_imports_one_that_imports_it() {
    for backend in BACKENDS {
        let modules = modules(backend);
        let known: BTreeSet<String> = modules.keys().cloned().collect();
        let graph: BTreeMap<String, BTreeSet<String>> = modules
            .iter()
            .filter(|(name, _)| *name != "lib")
            .map(|(name, source)| {
                let mut deps = imports(source, &known);
                deps.remove(name);
                (name.clone(), deps)
            })
            .collect();
        assert_eq!(cycle(&graph), None, "{backend} has an import cycle");
        for (name, deps) in &graph {
            assert!(
                name == "broker" || !deps.contains("broker"),
                "{backend}: {name}.rs imports broker.rs, which nothing may"
            );
        }
    }
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let graph: BTreeMap<String, BTreeSet<String>> =
        [("a", vec!["b"]), ("b", vec!["c"]), ("c", vec!["a"])]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.into_iter().map(str::to_owned).collect()))
            .collect();
    assert_eq!(
        cycle(&graph),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    let known: BTreeSet<String> = ["x", "y", "z"].iter().map(|s| s.to_string()).collect();
    assert_eq!(
        imports("use crate::{x, y::Y};\nlet a = crate::z::f();", &known),
        known
    );
}
