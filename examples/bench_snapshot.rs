//! `just bench-snapshot`: the local backend's snapshot, restore and clone
//! of a 1 GiB image volume holding 512 MiB of data, on a data directory
//! that shares blocks (xfs with reflink: the snapshot is a reflink) and on
//! one that does not (ext4: a sparse copy of the data ranges). Prints the
//! time to cut (the snapshot is ready when the call returns), the space
//! the data filesystem lost to it, and the restore time. Not a test.
//!
//! Each data directory is a fresh filesystem on a loop device (root).
//! Under `scripts/cluster.sh run` (KUBECONFIG set, as `just bench-snapshot`
//! runs it) the same follows through Kubernetes: time to `readyToUse` of a
//! VolumeSnapshot, and to Bound of a restored and a cloned claim.

#[path = "bench_snapshot/cluster.rs"]
mod cluster;
#[path = "common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use stowage::backend::local::Store;

const MIB: u64 = 1 << 20;
const VOLUME: u64 = 1024 * MIB;
const WRITTEN: u64 = 512 * MIB;

struct Figures {
    data_dir: &'static str,
    cut_s: f64,
    cut_used_mib: f64,
    restore_s: f64,
    restore_used_mib: f64,
    clone_s: f64,
}

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    let kube = match std::env::var_os("KUBECONFIG") {
        Some(_) => Some(runtime.block_on(cluster::Cluster::start())?),
        None => None,
    };
    let mut rows = Vec::new();
    let mut timed = Vec::new();
    for (label, node, mkfs) in [
        (
            "xfs, reflink=1",
            "bench-snapshot-xfs",
            &["mkfs.xfs", "-q", "-f", "-m", "reflink=1"][..],
        ),
        (
            "ext4 (no reflink)",
            "bench-snapshot-ext4",
            &["mkfs.ext4", "-q", "-F"][..],
        ),
    ] {
        let mount = Mounted::new(mkfs)?;
        rows.push(runtime.block_on(measure(label, &mount.dir.join("backend")))?);
        std::fs::remove_dir_all(mount.dir.join("backend"))?;
        if let Some(kube) = &kube {
            let figures = runtime.block_on(kube.measure(node, &mount.dir.join("agent")))?;
            timed.push((label, figures));
        }
    }
    println!("## local snapshots of a 1 GiB image volume with 512 MiB written\n");
    println!(
        "| data directory | cut s | space used by the snapshot MiB | restore s | space used by the restore MiB | clone s |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {:.3} | {:.1} | {:.3} | {:.1} | {:.3} |",
            r.data_dir, r.cut_s, r.cut_used_mib, r.restore_s, r.restore_used_mib, r.clone_s
        );
    }
    println!("\nspace used: the data filesystem's used bytes (statvfs) after less before, synced.");
    if timed.is_empty() {
        println!(
            "\n(no KUBECONFIG: the run through Kubernetes is left out; `just bench-snapshot` runs it)"
        );
        return Ok(());
    }
    println!("\n## the same through Kubernetes: VolumeSnapshot, restored and cloned claims\n");
    println!(
        "| data directory | VolumeSnapshot → readyToUse s | space used MiB | restored claim → Bound s | cloned claim → Bound s |"
    );
    println!("|---|---:|---:|---:|---:|");
    for (label, t) in &timed {
        println!(
            "| {label} | {:.2} | {:.1} | {:.2} | {:.2} |",
            t.ready_s, t.used_mib, t.restore_s, t.clone_s
        );
    }
    println!(
        "\nsnapshot-controller (external-snapshotter, tests/snapshotter/go.mod), stowage controller and one node agent; readyToUse includes the content job's polling of the agent's cut (1 s, then 2 s, ...)."
    );
    Ok(())
}

async fn measure(label: &'static str, dir: &Path) -> anyhow::Result<Figures> {
    std::fs::create_dir_all(dir)?;
    let store = Store::new(dir);
    std::fs::create_dir_all(store.root())?;
    let image = store.image_path("vol")?;
    write_volume(&image)?;
    let before = used(dir)?;
    let start = Instant::now();
    store.cut_snapshot("snap", "vol").await?;
    let cut_s = start.elapsed().as_secs_f64();
    let after_cut = used(dir)?;
    let start = Instant::now();
    store
        .create_from("restored", &store.snapshot_path("snap")?, VOLUME as i64)
        .await?;
    let restore_s = start.elapsed().as_secs_f64();
    let after_restore = used(dir)?;
    let start = Instant::now();
    store.create_from("cloned", &image, VOLUME as i64).await?;
    let clone_s = start.elapsed().as_secs_f64();
    Ok(Figures {
        data_dir: label,
        cut_s,
        cut_used_mib: (after_cut - before) as f64 / MIB as f64,
        restore_s,
        restore_used_mib: (after_restore - after_cut) as f64 / MIB as f64,
        clone_s,
    })
}

/// A sparse 1 GiB image with 512 MiB of incompressible data in 1 MiB
/// runs, every other MiB.
fn write_volume(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    // Over an image that may exist (a claim's): its size is kept.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    if file.metadata()?.len() < VOLUME {
        file.set_len(VOLUME)?;
    }
    let mut block = vec![0u8; MIB as usize];
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for run in 0..(WRITTEN / MIB) {
        for chunk in block.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
        }
        file.write_all_at(&block, run * 2 * MIB)?;
    }
    file.sync_all()?;
    Ok(())
}

/// Bytes in use on the filesystem holding `dir`, after a sync.
fn used(dir: &Path) -> anyhow::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    Command::new("sync").status()?;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: statvfs is plain data; zero is a valid value of it.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a struct to fill.
    if unsafe { libc::statvfs(path.as_ptr(), &mut s) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok((s.f_blocks - s.f_bfree) * s.f_frsize)
}

/// A fresh sparse filesystem of 8 GiB (room for a claim, its snapshot, a
/// restore and a clone) on a loop device, mounted on a temporary
/// directory; unmounted and removed when dropped.
struct Mounted {
    image: PathBuf,
    dir: PathBuf,
}

impl Mounted {
    fn new(mkfs: &[&str]) -> anyhow::Result<Self> {
        let base = std::env::temp_dir().join(format!(
            "stowage-bench-snapshot-{}-{}",
            std::process::id(),
            mkfs[0]
        ));
        let image = base.with_extension("img");
        let dir = base.with_extension("mnt");
        std::fs::create_dir_all(&dir)?;
        std::fs::File::create(&image)?.set_len(8192 * MIB)?;
        run(Command::new(mkfs[0]).args(&mkfs[1..]).arg(&image))?;
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&dir))?;
        Ok(Mounted { image, dir })
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        // A node agent killed a moment ago may still hold it.
        for _ in 0..50 {
            if Command::new("umount")
                .arg(&self.dir)
                .status()
                .is_ok_and(|s| s.success())
            {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = std::fs::remove_dir(&self.dir);
        let _ = std::fs::remove_file(&self.image);
    }
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command.status()?;
    anyhow::ensure!(status.success(), "{command:?} failed: {status}");
    Ok(())
}
