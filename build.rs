//! Compiles the protos in proto/ with protox (pure Rust), so building needs no
//! system protoc, and records the git commit for `stowage --version` and
//! `stowage_build_info`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/csi.proto", "proto/pluginregistration.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;

    println!("cargo:rustc-env=STOWAGE_GIT_COMMIT={}", commit());
    watch_git_head();
    Ok(())
}

/// The short commit of the checkout; else `STOWAGE_COMMIT` (builds from a
/// source tree without `.git`, such as the Containerfile's); else `unknown`.
fn commit() -> String {
    git(&["rev-parse", "--short=12", "HEAD"])
        .or_else(|| {
            std::env::var("STOWAGE_COMMIT")
                .ok()
                .map(|c| c.trim().to_string())
                .filter(|c| !c.is_empty())
        })
        .unwrap_or_else(|| "unknown".to_string())
}

/// Reruns this script when HEAD moves (a commit, a checkout), and only then.
/// Cargo reruns on every build for a watched path that does not exist, so
/// only existing files are named.
fn watch_git_head() {
    println!("cargo:rerun-if-env-changed=STOWAGE_COMMIT");
    let (Some(git_dir), Some(common_dir)) = (
        git(&["rev-parse", "--path-format=absolute", "--git-dir"]),
        git(&["rev-parse", "--path-format=absolute", "--git-common-dir"]),
    ) else {
        return;
    };
    let (git_dir, common_dir) = (PathBuf::from(git_dir), PathBuf::from(common_dir));
    let mut watched = vec![git_dir.join("HEAD"), common_dir.join("packed-refs")];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(common_dir.join(&branch));
        watched.push(git_dir.join(&branch));
    }
    for path in watched.iter().filter(|p| Path::is_file(p)) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}
