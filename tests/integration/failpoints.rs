//! Every failpoint in src/ is set by some test: a crash point no test arms
//! proves nothing and only looks like coverage.

use std::path::{Path, PathBuf};

use crate::harness::repo_root;

const CALL: &str = "failpoint::hit(";

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The names of every `failpoint::hit("NAME")` under `dir`, with where.
fn failpoints_in(dir: &Path) -> Vec<(String, String)> {
    let mut files = Vec::new();
    rust_files(dir, &mut files);
    let mut found = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let Some(at) = line.find(CALL) else { continue };
            let where_ = format!("{}:{}", file.display(), n + 1);
            let arg = &line[at + CALL.len()..];
            // A name built at run time could not be checked here.
            let name = arg
                .strip_prefix('"')
                .and_then(|rest| rest.split_once('"'))
                .map(|(name, _)| name.to_string())
                .unwrap_or_else(|| panic!("{where_}: failpoint name is not a literal: {line}"));
            found.push((name, where_));
        }
    }
    found
}

/// The test sources, without this file (which names no failpoint).
fn test_sources() -> String {
    let mut files = Vec::new();
    rust_files(&repo_root().join("tests"), &mut files);
    files
        .iter()
        .filter(|f| !f.ends_with("integration/failpoints.rs"))
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect()
}

#[test]
fn every_failpoint_in_src_is_set_by_a_test() {
    let failpoints = failpoints_in(&repo_root().join("src"));
    // The scan must see the failpoints it is there to check.
    assert!(
        failpoints
            .iter()
            .any(|(n, _)| n == "controller-after-pv-created"),
        "scan found no known failpoint: {failpoints:?}"
    );
    // A name used twice would crash at whichever comes first.
    let mut names: Vec<_> = failpoints.iter().map(|(n, _)| n).collect();
    names.sort();
    let twice: Vec<_> = names.windows(2).filter(|w| w[0] == w[1]).collect();
    assert!(twice.is_empty(), "failpoints named twice: {twice:?}");
    let tests = test_sources();
    let unset: Vec<_> = failpoints
        .iter()
        .filter(|(name, _)| !tests.contains(&format!("\"{name}\"")))
        .map(|(name, at)| format!("{name} ({at})"))
        .collect();
    assert!(
        unset.is_empty(),
        "failpoints no test sets: {}",
        unset.join(", ")
    );
}
