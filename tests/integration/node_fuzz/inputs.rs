//! What the fuzz cases are made of: the calls, and strategies for ids,
//! request paths, capabilities, sizes and secrets.

use std::collections::HashMap;

use proptest::prelude::*;
use stowage::proto::csi::v1 as csi;
use stowage::proto::csi::v1::volume_capability::{
    AccessMode, AccessType, BlockVolume, MountVolume,
};

use super::MIB;

#[derive(Debug, Clone)]
pub enum Call {
    Stage(
        String,
        String,
        Option<csi::VolumeCapability>,
        HashMap<String, String>,
    ),
    Unstage(String, String),
    Publish(String, String, String, Option<csi::VolumeCapability>, bool),
    Unpublish(String, String),
    Stats(String, String),
    Expand(String, String, i64, i64),
    Create(
        String,
        i64,
        i64,
        Vec<csi::VolumeCapability>,
        HashMap<String, String>,
    ),
    Delete(String),
    ControllerExpand(String, i64, i64),
    Validate(String, Vec<csi::VolumeCapability>),
}

pub fn mount_cap(fs: &str, flags: &[&str]) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            mount_flags: flags.iter().map(|f| f.to_string()).collect(),
            ..Default::default()
        })),
        access_mode: Some(AccessMode { mode: 1 }),
    }
}

pub fn block_cap() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode { mode: 1 }),
    }
}

fn capability() -> impl Strategy<Value = csi::VolumeCapability> {
    let fs = prop::sample::select(vec!["", "ext4", "xfs", "btrfs", "ext4\0", "../x", "EXT4"]);
    let flag = prop::sample::select(vec![
        "ro",
        "noexec",
        "bind",
        "remount",
        "x-a=b",
        "",
        "defaults,rw",
        "loop",
        "nosuid",
    ]);
    let access = prop_oneof![
        4 => (fs, prop::collection::vec(flag, 0..2))
            .prop_map(|(fs, flags)| Some(mount_cap(fs, &flags).access_type.unwrap())),
        2 => Just(Some(AccessType::Block(BlockVolume {}))),
        1 => Just(None),
    ];
    // Mostly modes a local volume serves, so that calls get as far as a
    // mount; the rest no driver could.
    let mode = prop_oneof![
        3 => prop::sample::select(vec![1, 2, 6, 7]),
        1 => prop::sample::select(vec![-1, 0, 3, 4, 5, 99, i32::MAX]),
    ];
    (access, mode).prop_map(|(access_type, mode)| csi::VolumeCapability {
        access_type,
        access_mode: Some(AccessMode { mode }),
    })
}

/// A capability most of the time: without one a call stops at once.
fn maybe_capability() -> impl Strategy<Value = Option<csi::VolumeCapability>> {
    prop_oneof![4 => capability().prop_map(Some), 1 => Just(None)]
}

fn id() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::sample::select(vec!["vol-a", "vol-d", "vol-b", "new-1"]).prop_map(String::from),
        1 => prop::sample::select(vec!["", ".", "..", "../../etc", "/abs", "a/b", "x\0y", ".hidden", "vol-a\n"]).prop_map(String::from),
        1 => Just("a".repeat(129)),
        1 => "\\PC{0,12}",
    ]
}

fn size() -> impl Strategy<Value = i64> {
    prop_oneof![
        prop::sample::select(vec![
            0,
            1,
            -1,
            16 * MIB,
            40 * MIB,
            300 * MIB,
            1 << 40,
            1 << 62,
            i64::MAX,
            i64::MAX - 1,
            i64::MAX / MIB * MIB + 1,
            i64::MIN
        ]),
        any::<i64>(),
    ]
}

/// Request paths: kubelet's own shapes, the planted symlinks, text that is
/// no plain path, and random walks over the tree's names.
fn path(k: String) -> impl Strategy<Value = String> {
    let shapes = prop::sample::select(vec![
        "{K}/plugins/kubernetes.io/csi/local.stowage.dev/vol-a/globalmount",
        "{K}/plugins/kubernetes.io/csi/pv/vol-d/globalmount",
        "{K}/plugins/kubernetes.io/csi/volumeDevices/staging/vol-b",
        "{K}/pods/p1/volumes/kubernetes.io~csi/vol-a/mount",
        "{K}/pods/p4/volumes/kubernetes.io~csi/vol-d/mount",
        "{K}/plugins/kubernetes.io/csi/volumeDevices/publish/vol-b/p1",
        "{K}/pods/evil/volumes/kubernetes.io~csi/vol-a/mount",
        "{K}/pods/p1/volumes/kubernetes.io~csi/link/mount",
        "{K}/pods/p2/volumes/kubernetes.io~csi/vol-a/mount",
        "{K}/plugins/kubernetes.io/csi/evil/vol-a/globalmount",
        "{K}/plugins/kubernetes.io/csi/local.stowage.dev/vol-x/globalmount",
        "{K}/plugins/kubernetes.io/csi/volumeDevices/publish/vol-b/p3",
        "{K}/plugins/kubernetes.io/csi/up/csi/x/globalmount",
        "{K}/pods/p1/volumes/kubernetes.io~csi/../../../../outside/mount",
        "{K}/pods/./p1/volumes/kubernetes.io~csi/vol-a/mount",
        "{K}//pods/p1/volumes/kubernetes.io~csi/vol-a/mount",
        "{K}/pods/p1/volumes/kubernetes.io~csi/vol-a/mount/",
        "{K}/pods/p\0/volumes/kubernetes.io~csi/vol-a/mount",
        "{K}/pods/\u{202e}\u{fffd}/volumes/kubernetes.io~csi/vol-a/mount",
        "{K}",
        "{K}/..",
        "/etc/passwd",
        "relative/mount",
        "",
        "/",
    ])
    .prop_map(String::from);
    let long = prop::sample::select(vec![255usize, 256, 5000]).prop_map(|n| {
        format!(
            "{{K}}/pods/{}/volumes/kubernetes.io~csi/vol-a/mount",
            "a".repeat(n)
        )
    });
    let word = prop::sample::select(vec![
        "pods",
        "p1",
        "evil",
        "..",
        ".",
        "",
        "volumes",
        "kubernetes.io~csi",
        "vol-a",
        "mount",
        "plugins",
        "kubernetes.io",
        "csi",
        "volumeDevices",
        "publish",
        "staging",
        "globalmount",
        "up",
        "link",
    ]);
    let walk = prop::collection::vec(word, 1..9).prop_map(|w| format!("{{K}}/{}", w.join("/")));
    prop_oneof![4 => shapes, 1 => long, 3 => walk].prop_map(move |p| p.replace("{K}", &k))
}

/// Calls as kubelet makes them, on the volumes that exist, with the right
/// paths: they get as far as real mounts, which the wild calls then meet.
fn coherent(k: String) -> impl Strategy<Value = Call> {
    let volume = prop::sample::select(vec![
        (
            "vol-a",
            "plugins/kubernetes.io/csi/local.stowage.dev/vol-a/globalmount",
            "pods/p1/volumes/kubernetes.io~csi/vol-a/mount",
            false,
        ),
        (
            "vol-d",
            "plugins/kubernetes.io/csi/pv/vol-d/globalmount",
            "pods/p4/volumes/kubernetes.io~csi/vol-d/mount",
            false,
        ),
        (
            "vol-b",
            "plugins/kubernetes.io/csi/volumeDevices/staging/vol-b",
            "plugins/kubernetes.io/csi/volumeDevices/publish/vol-b/p1",
            true,
        ),
    ]);
    let flags = prop::sample::select(vec![vec![], vec!["ro"], vec!["noatime"], vec!["loop"]]);
    (volume, flags, any::<bool>(), 0..6u8, size()).prop_map(
        move |((id, staging, target, block), flags, readonly, op, bytes)| {
            let (id, staging, target) = (
                id.to_string(),
                format!("{k}/{staging}"),
                format!("{k}/{target}"),
            );
            let cap = if block {
                block_cap()
            } else {
                mount_cap("ext4", &flags)
            };
            match op {
                0 => Call::Stage(id, staging, Some(cap), HashMap::new()),
                1 => Call::Publish(id, target, staging, Some(cap), readonly),
                2 => Call::Unpublish(id, target),
                3 => Call::Unstage(id, staging),
                4 => Call::Stats(id, target),
                _ => Call::Expand(id, target, bytes.clamp(0, 64 * MIB), 0),
            }
        },
    )
}

pub fn calls(k: String) -> impl Strategy<Value = Call> {
    prop_oneof![1 => coherent(k.clone()), 1 => wild(k)]
}

fn wild(k: String) -> impl Strategy<Value = Call> {
    let secrets = prop::collection::hash_map("\\PC{0,8}", "\\PC{0,8}", 0..3);
    let params = prop::collection::hash_map(
        prop::sample::select(vec![
            "fsType",
            "layout",
            "csi.storage.k8s.io/fstype",
            "bogus",
        ])
        .prop_map(String::from),
        prop::sample::select(vec!["ext4", "xfs", "dir", "image", "", "btrfs"])
            .prop_map(String::from),
        0..3,
    );
    let caps = prop::collection::vec(capability(), 0..3);
    prop_oneof![
        (id(), path(k.clone()), maybe_capability(), secrets)
            .prop_map(|(a, b, c, d)| Call::Stage(a, b, c, d)),
        (id(), path(k.clone())).prop_map(|(a, b)| Call::Unstage(a, b)),
        (
            id(),
            path(k.clone()),
            path(k.clone()),
            maybe_capability(),
            any::<bool>()
        )
            .prop_map(|(a, b, c, d, e)| Call::Publish(a, b, c, d, e)),
        (id(), path(k.clone())).prop_map(|(a, b)| Call::Unpublish(a, b)),
        (id(), path(k.clone())).prop_map(|(a, b)| Call::Stats(a, b)),
        (id(), path(k), size(), size()).prop_map(|(a, b, c, d)| Call::Expand(a, b, c, d)),
        (
            id(),
            size(),
            size(),
            prop::collection::vec(capability(), 0..3),
            params
        )
            .prop_map(|(a, b, c, d, e)| Call::Create(a, b, c, d, e)),
        // The volumes the other calls use stay: deleting one would leave
        // the rest of the run nothing to mount.
        prop_oneof![
            Just("new-1".to_string()),
            id().prop_filter("kept", |i| !i.starts_with("vol-"))
        ]
        .prop_map(Call::Delete),
        (id(), size(), size()).prop_map(|(a, b, c)| Call::ControllerExpand(a, b, c)),
        (id(), caps).prop_map(|(a, b)| Call::Validate(a, b)),
    ]
}

pub fn kind(call: &Call) -> &'static str {
    match call {
        Call::Stage(..) => "NodeStageVolume",
        Call::Unstage(..) => "NodeUnstageVolume",
        Call::Publish(..) => "NodePublishVolume",
        Call::Unpublish(..) => "NodeUnpublishVolume",
        Call::Stats(..) => "NodeGetVolumeStats",
        Call::Expand(..) => "NodeExpandVolume",
        Call::Create(..) => "CreateVolume",
        Call::Delete(..) => "DeleteVolume",
        Call::ControllerExpand(..) => "ControllerExpandVolume",
        Call::Validate(..) => "ValidateVolumeCapabilities",
    }
}
