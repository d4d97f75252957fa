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
    let redacted = redacted_debug(&descriptors)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .skip_debug(redacted)
        .compile_fds(descriptors)?;

    println!("cargo:rustc-env=STOWAGE_GIT_COMMIT={}", commit());
    watch_git_head();
    Ok(())
}

/// Every message with a `secrets` field loses its derived `Debug` (which
/// would print the secrets wherever a request is logged) for one written
/// here into `OUT_DIR/<package>.redacted.rs`: the same fields, with the
/// secrets' keys shown and their values not. Returns the messages' paths.
fn redacted_debug(
    descriptors: &protox::prost_reflect::prost_types::FileDescriptorSet,
) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut paths = Vec::new();
    for file in &descriptors.file {
        let mut code = String::new();
        let mut names = Vec::new();
        for message in &file.message_type {
            if !message.field.iter().any(|f| f.name() == "secrets") {
                continue;
            }
            paths.push(format!(".{}.{}", file.package(), message.name()));
            names.push(format!("{:?}", message.name()));
            code.push_str(&debug_impl(message));
        }
        code.push_str(&format!(
            "/// Messages whose `Debug` hides their secrets.\npub const REDACTED: &[&str] = &[{}];\n",
            names.join(", ")
        ));
        std::fs::write(
            out_dir.join(format!("{}.redacted.rs", file.package())),
            code,
        )?;
    }
    Ok(paths)
}

fn debug_impl(message: &protox::prost_reflect::prost_types::DescriptorProto) -> String {
    let mut fields = String::new();
    let mut oneofs_done = Vec::new();
    for field in &message.field {
        // A real oneof is one Rust field named after the oneof.
        let name = match field.oneof_index {
            Some(i) if !field.proto3_optional() => {
                if oneofs_done.contains(&i) {
                    continue;
                }
                oneofs_done.push(i);
                message.oneof_decl[i as usize].name().to_string()
            }
            _ => field.name().to_string(),
        };
        let rust = if ["type", "ref", "match", "mod", "move", "self"].contains(&name.as_str()) {
            format!("r#{name}")
        } else {
            name.clone()
        };
        let value = if name == "secrets" {
            format!("&crate::proto::Redacted(&self.{rust})")
        } else {
            format!("&self.{rust}")
        };
        fields.push_str(&format!("            .field({name:?}, {value})\n"));
    }
    format!(
        "impl ::core::fmt::Debug for {n} {{\n    fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {{\n        f.debug_struct({n:?})\n{fields}            .finish()\n    }}\n}}\n",
        n = message.name()
    )
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
