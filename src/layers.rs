//! The layering `lib.rs` states, checked over the source itself: which
//! top-level module names which (`crate::x`, `use crate::{x, y}`), that
//! each names only modules of lower layers, and so that the graph has no
//! cycle. A new top-level module must be given its layer here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each top-level module's layer, lowest first; a module may name only
/// modules of lower layers.
const LAYERS: &[(&str, u8)] = &[
    ("compact_map", 0),
    ("host", 1),
    ("proto", 1),
    ("quantity", 1),
    ("retry", 1),
    ("failpoint", 1),
    ("kubeapi", 1),
    ("telemetry", 1),
    ("crd", 1),
    ("snapshot_api", 1),
    ("layers", 1),
    ("backend", 2),
    ("csi", 3),
    ("testing", 3),
    ("controller", 4),
    ("node", 4),
];

type Graph = BTreeMap<String, BTreeMap<String, String>>;

/// Who names whom: module → module it names → the first place it does.
fn graph(src: &Path) -> Graph {
    let mut graph = Graph::new();
    for file in rust_files(src) {
        let Some(from) = top_module(src, &file) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap();
        let edges = graph.entry(from.clone()).or_default();
        for (line, to) in named_modules(&text) {
            if to != from {
                let root = src.parent().unwrap_or(src);
                let shown = file.strip_prefix(root).unwrap_or(&file);
                let place = format!("{}:{line}", shown.display());
                edges.entry(to).or_insert(place);
            }
        }
    }
    graph
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

/// The top-level module a file belongs to; none for the crate roots.
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let first = file.strip_prefix(src).ok()?.components().next()?;
    let name = first.as_os_str().to_str()?;
    let name = name.strip_suffix(".rs").unwrap_or(name);
    (name != "lib" && name != "main").then(|| name.to_string())
}

/// The top-level modules `text` names through `crate::`, each with a
/// line it does so on. Comments are left out: docs may name anything.
fn named_modules(text: &str) -> Vec<(usize, String)> {
    let code: String = text
        .lines()
        .map(|l| l.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    let line_of = |at: usize| code[..at].matches('\n').count() + 1;
    let mut named = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        if code[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &code[at + "crate::".len()..];
        let group = rest.strip_prefix('{').map(top_level_items);
        for item in group.unwrap_or_else(|| vec![rest]) {
            let ident: String = item
                .trim_start()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !ident.is_empty() {
                named.push((line_of(at), ident));
            }
        }
    }
    named
}

/// The items of a `{a, b::{c, d}, e}` group, from just after its `{`.
fn top_level_items(group: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                items.push(&group[start..i]);
                break;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&group[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items
}

/// A cycle of the graph, as the modules along it, if there is one.
fn cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        graph: &Graph,
        module: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|m| m == module) {
            let mut cycle = path[at..].to_vec();
            cycle.push(module.to_string());
            return Some(cycle);
        }
        if !done.insert(module.to_string()) {
            return None;
        }
        path.push(module.to_string());
        for next in graph.get(module).into_iter().flat_map(|e| e.keys()) {
            if let Some(cycle) = visit(graph, next, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|m| visit(graph, m, &mut Vec::new(), &mut done))
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn the_crate_has_no_import_cycle() {
    let graph = graph(&src());
    assert!(graph.len() >= 10, "read too little of src/: {graph:?}");
    if let Some(cycle) = cycle(&graph) {
        let places: Vec<_> = cycle.windows(2).map(|w| &graph[&w[0]][&w[1]]).collect();
        panic!("import cycle {}: {places:?}", cycle.join(" -> "));
    }
}

#[test]
fn every_module_names_only_lower_layers() {
    let layer = |m: &str| LAYERS.iter().find(|(name, _)| *name == m).map(|l| l.1);
    for (from, edges) in graph(&src()) {
        let Some(own) = layer(&from) else {
            panic!("src/{from} has no layer: give it one in src/layers.rs");
        };
        for (to, place) in edges {
            let Some(theirs) = layer(&to) else {
                continue; // not a module of ours: `crate::` in a string
            };
            assert!(
                theirs < own,
                "{from} (layer {own}) names {to} (layer {theirs}) at {place}"
            );
        }
    }
}

#[test]
fn a_cycle_is_found_and_a_tree_has_none() {
    let edges = |pairs: &[(&str, &str)]| {
        let mut graph = Graph::new();
        for (a, b) in pairs {
            graph
                .entry(a.to_string())
                .or_default()
                .insert(b.to_string(), String::new());
        }
        graph
    };
    let looped = edges(&[("node", "csi"), ("csi", "host"), ("host", "node")]);
    assert_eq!(
        cycle(&looped),
        Some(["csi", "host", "node", "csi"].map(String::from).to_vec())
    );
    let tree = edges(&[("node", "csi"), ("csi", "host"), ("node", "host")]);
    assert_eq!(cycle(&tree), None);
}

#[test]
fn uses_are_read_from_paths_and_groups_but_not_comments() {
    // Spelled so that this file names none of them itself.
    let text = "use CRATE{backend::local, crd::{Volume, NODE_LABEL}, kubeapi};\n\
                // CRATEcontroller is only mentioned\n\
                let x = CRATEhost::paths::root();\n\
                let y = $CRATEproto::X; let z = notCRATEcsi::Y;"
        .replace("CRATE", "crate::");
    let named: Vec<_> = named_modules(&text).into_iter().map(|n| n.1).collect();
    assert_eq!(named, ["backend", "crd", "kubeapi", "host", "proto"]);
}
