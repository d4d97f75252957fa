use std::collections::BTreeMap;

use super::*;

fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn defaults_are_ext4_images() {
    assert_eq!(Parameters::parse(&params(&[])), Ok(Parameters::default()));
}

#[test]
fn accepts_known_and_reserved_keys() {
    let p = Parameters::parse(&params(&[
        ("fsType", "xfs"),
        ("layout", "dir"),
        ("csi.storage.k8s.io/provisioner-secret-name", "x"),
    ]))
    .unwrap();
    assert_eq!(
        p,
        Parameters {
            fs_type: FsType::Xfs,
            layout: Layout::Dir,
            preallocate: false,
        }
    );
    let p = Parameters::parse(&params(&[("csi.storage.k8s.io/fstype", "xfs")])).unwrap();
    assert_eq!(p.fs_type, FsType::Xfs);
}

#[test]
fn errors_name_the_parameter_and_the_fix() {
    let e = Parameters::parse(&params(&[("fstype", "ext4")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"fstype\"") && e.contains("fsType"), "{e}");
    let e = Parameters::parse(&params(&[("fsType", "btrfs")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("btrfs") && e.contains("ext4 or xfs"), "{e}");
    let e = Parameters::parse(&params(&[("layout", "lvm")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("lvm") && e.contains("image or dir"), "{e}");
}

#[test]
fn preallocate_is_a_boolean_for_images_only() {
    let p = Parameters::parse(&params(&[("preallocate", "true")])).unwrap();
    assert!(p.preallocate);
    let p = Parameters::parse(&params(&[("preallocate", "false"), ("fsType", "xfs")])).unwrap();
    assert!(!p.preallocate);
    assert!(
        !Parameters::default().preallocate,
        "images are sparse unless asked"
    );
    for bad in ["yes", "True", "1", ""] {
        let e = Parameters::parse(&params(&[("preallocate", bad)])).unwrap_err();
        assert_eq!(e, ParameterError::Preallocate(bad.into()));
        assert!(e.to_string().contains("true or false"), "{e}");
    }
    let e = Parameters::parse(&params(&[("preallocate", "true"), ("layout", "dir")])).unwrap_err();
    assert_eq!(e, ParameterError::PreallocateDir);
    // Without preallocation a directory is fine.
    assert!(Parameters::parse(&params(&[("preallocate", "false"), ("layout", "dir")])).is_ok());
}

#[test]
fn sizes_round_up_to_what_the_filesystem_needs() {
    let ext4 = Parameters::default();
    assert_eq!(ext4.allocated_bytes(1), 16 * MIB);
    assert_eq!(ext4.allocated_bytes(100 * MIB + 1), 101 * MIB);
    let xfs = Parameters {
        fs_type: FsType::Xfs,
        ..Default::default()
    };
    assert_eq!(xfs.allocated_bytes(MIB), 300 * MIB);
}

#[test]
fn sizes_near_the_int64_limit_never_wrap() {
    let p = Parameters::default();
    let last_mib = i64::MAX / MIB * MIB;
    assert_eq!(p.checked_allocated_bytes(last_mib), Some(last_mib));
    assert_eq!(p.checked_allocated_bytes(last_mib + 1), None);
    assert_eq!(p.checked_allocated_bytes(i64::MAX), None);
    assert_eq!(p.allocated_bytes(i64::MAX), i64::MAX);
    assert_eq!(p.allocated_bytes(i64::MIN), 16 * MIB);
}

#[test]
fn volume_ids_cannot_leave_the_store() {
    for bad in [
        "",
        ".",
        "..",
        "../x",
        "a/b",
        "/abs",
        ".hidden",
        "a\0b",
        &"x".repeat(129),
    ] {
        assert!(validate_volume_id(bad).is_err(), "{bad:?} accepted");
    }
    for good in ["pvc-0f0e-11", "vol_1", "a.b"] {
        assert!(validate_volume_id(good).is_ok(), "{good:?} refused");
    }
}
