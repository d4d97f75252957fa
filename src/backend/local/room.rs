//! How much a node's data filesystem can promise to volumes, and when it is
//! too full to take more.
//!
//! Images are sparse: a volume takes its blocks only as it is written, so
//! the host can fill the filesystem underneath every loop device. The rule:
//!
//! - capacity = free space + what stowage's own images already hold − reserve,
//!   unless `--capacity` fixes it. Counting our own blocks back in keeps
//!   the capacity steady as our volumes fill; the controller subtracts what
//!   it promised to Volumes.
//! - pressure when free space < reserve: new volumes stop landing here and
//!   the claims of this node's volumes are warned.
//! - a volume grows only within capacity − what the images present promise.
//!
//! The arithmetic is pure; `measure` is the one effect (statvfs and a scan
//! of the images).

use std::fmt;
use std::os::unix::fs::MetadataExt;

use super::Store;
use crate::quantity::format_bytes;

/// Bytes of the data filesystem kept free of volumes: a quantity or a
/// percentage of the filesystem's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserve {
    Bytes(i64),
    /// Hundredths of a percent, so "2.5%" is exact.
    Basis(u32),
}

/// What `--capacity-reserve` is when not given.
pub const DEFAULT_RESERVE: &str = "5%";

impl Reserve {
    pub fn parse(text: &str) -> Result<Reserve, String> {
        let bad = || {
            format!(
                "{text:?} is not a reserve: use a quantity such as 10Gi or a percentage such as 5%"
            )
        };
        if let Some(percent) = text.trim().strip_suffix('%') {
            let value: f64 = percent.trim().parse().map_err(|_| bad())?;
            if !(0.0..=100.0).contains(&value) {
                return Err(format!("{text:?}: a percentage reserve must be 0% to 100%"));
            }
            return Ok(Reserve::Basis((value * 100.0).round() as u32));
        }
        match crate::quantity::parse_bytes(text) {
            Ok(bytes) if bytes >= 0 => Ok(Reserve::Bytes(bytes)),
            Ok(_) => Err(format!("{text:?}: a reserve cannot be negative")),
            Err(_) => Err(bad()),
        }
    }

    /// The reserve on a filesystem of `total` bytes.
    pub fn of(self, total: i64) -> i64 {
        match self {
            Reserve::Bytes(b) => b,
            Reserve::Basis(b) => (i128::from(total.max(0)) * i128::from(b) / 10_000) as i64,
        }
    }
}

impl fmt::Display for Reserve {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reserve::Bytes(b) => write!(f, "{}", format_bytes(*b)),
            Reserve::Basis(b) if b % 100 == 0 => write!(f, "{}%", b / 100),
            Reserve::Basis(b) => write!(f, "{}%", f64::from(*b) / 100.0),
        }
    }
}

/// How a node decides its capacity (`--capacity`, `--capacity-reserve`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// A fixed capacity; None derives it from the filesystem.
    pub capacity: Option<i64>,
    pub reserve: Reserve,
}

/// The data filesystem as statvfs sees it (`available` excludes blocks
/// reserved for root, which the agent cannot use without CAP_SYS_RESOURCE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Disk {
    pub total: i64,
    pub available: i64,
}

/// What stowage's own images take. Directory volumes are not counted: they
/// have no size to promise, and walking them would cost a scan of every
/// file they hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Own {
    /// Sum of the images' sizes: what they may grow to take.
    pub promised: i64,
    /// Sum of the blocks they hold now.
    pub held: i64,
}

/// The data filesystem is below its reserve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pressure {
    pub available: i64,
    pub reserve: i64,
}

impl fmt::Display for Pressure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the data filesystem has {} bytes free, less than its reserve of {} bytes \
             (--capacity-reserve); sparse volumes here may fail writes with ENOSPC: \
             free space on the node",
            self.available, self.reserve
        )
    }
}

/// Everything the node reports and checks, from one measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    pub disk: Disk,
    pub own: Own,
    pub reserve: i64,
    pub capacity: i64,
}

impl Room {
    pub fn plan(policy: Policy, disk: Disk, own: Own) -> Room {
        let reserve = policy.reserve.of(disk.total);
        let capacity = policy.capacity.unwrap_or_else(|| {
            disk.available
                .saturating_add(own.held)
                .saturating_sub(reserve)
                .max(0)
        });
        Room {
            disk,
            own,
            reserve,
            capacity,
        }
    }

    pub fn pressure(&self) -> Option<Pressure> {
        (self.disk.available < self.reserve).then_some(Pressure {
            available: self.disk.available,
            reserve: self.reserve,
        })
    }

    /// Whether a volume of `current` bytes (0 for a new one) may take
    /// `wanted`, given what the images present already promise.
    pub fn check_growth(&self, current: i64, wanted: i64) -> Result<(), RoomError> {
        if wanted <= current {
            return Ok(());
        }
        if wanted > self.capacity {
            return Err(RoomError::BeyondCapacity {
                wanted,
                capacity: self.capacity,
            });
        }
        let unpromised = self.capacity.saturating_sub(self.own.promised).max(0);
        let more = wanted - current.max(0);
        if more > unpromised {
            return Err(RoomError::NoRoom {
                more,
                unpromised,
                capacity: self.capacity,
            });
        }
        Ok(())
    }
}

/// A size the node cannot hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoomError {
    /// Never, whatever is deleted: the volume alone exceeds the node.
    #[error("{wanted} bytes can never fit on this node: its capacity is {capacity} bytes")]
    BeyondCapacity { wanted: i64, capacity: i64 },
    /// Not now: other volumes hold the rest.
    #[error(
        "{more} more bytes do not fit on this node: {unpromised} of its {capacity} bytes are \
         not promised to volumes; delete volumes or free space there"
    )]
    NoRoom {
        more: i64,
        unpromised: i64,
        capacity: i64,
    },
}

/// statvfs of the data directory and a scan of the images in `store`.
pub fn measure(store: &Store, policy: Policy) -> std::io::Result<Room> {
    // The data directory is made with the first volume: until then, the
    // filesystem it will be on is that of its nearest existing ancestor.
    let mut at = store.root();
    while !at.exists()
        && let Some(parent) = at.parent()
    {
        at = parent;
    }
    let fs = crate::host::statvfs::statvfs(at)?;
    let disk = Disk {
        total: fs.total_bytes,
        available: fs.available_bytes,
    };
    Ok(Room::plan(policy, disk, own_usage(store)?))
}

/// Sizes and blocks of the images (finished or being made) in `store`.
fn own_usage(store: &Store) -> std::io::Result<Own> {
    let mut own = Own::default();
    let entries = match std::fs::read_dir(store.root()) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(own),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.ends_with(".img") || name.ends_with(".img.tmp")) {
            continue;
        }
        // A file deleted between listing and stat takes nothing.
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        own.promised = own.promised.saturating_add(meta.len() as i64);
        own.held = own.held.saturating_add(meta.blocks() as i64 * 512);
    }
    Ok(own)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GI: i64 = 1 << 30;

    fn policy(capacity: Option<i64>, reserve: &str) -> Policy {
        Policy {
            capacity,
            reserve: Reserve::parse(reserve).unwrap(),
        }
    }

    #[test]
    fn reserves_parse_as_quantities_or_percentages() {
        assert_eq!(Reserve::parse("5%"), Ok(Reserve::Basis(500)));
        assert_eq!(Reserve::parse("2.5%"), Ok(Reserve::Basis(250)));
        assert_eq!(Reserve::parse("0%"), Ok(Reserve::Basis(0)));
        assert_eq!(Reserve::parse("10Gi"), Ok(Reserve::Bytes(10 * GI)));
        assert_eq!(Reserve::parse("0"), Ok(Reserve::Bytes(0)));
        for bad in ["", "%", "-1%", "101%", "-1Gi", "five%", "10GB", "1e400"] {
            let e = Reserve::parse(bad).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
        assert_eq!(Reserve::parse("2.5%").unwrap().to_string(), "2.5%");
        assert_eq!(Reserve::parse("5%").unwrap().to_string(), "5%");
        assert_eq!(Reserve::parse("1Gi").unwrap().to_string(), "1Gi");
    }

    #[test]
    fn a_percentage_is_of_the_filesystems_size() {
        assert_eq!(Reserve::Basis(500).of(100 * GI), 5 * GI);
        assert_eq!(Reserve::Basis(10_000).of(7), 7);
        assert_eq!(Reserve::Basis(500).of(i64::MAX), i64::MAX / 20);
        assert_eq!(Reserve::Bytes(3).of(100 * GI), 3);
    }

    /// Each row: fixed capacity, reserve, (total, available), held by our
    /// images, capacity reported.
    #[test]
    fn capacity_is_free_space_plus_our_own_blocks_less_the_reserve() {
        let rows = [
            // An empty node: free space less 5% of 100Gi.
            (None, "5%", (100 * GI, 80 * GI), 0, 75 * GI),
            // Our images hold 10Gi of it: they are counted back in.
            (None, "5%", (100 * GI, 70 * GI), 10 * GI, 75 * GI),
            // Someone else wrote 10Gi: capacity shrinks by as much.
            (None, "5%", (100 * GI, 60 * GI), 10 * GI, 65 * GI),
            (None, "1Gi", (100 * GI, 60 * GI), 0, 59 * GI),
            // Less free than the reserve offers nothing, never less.
            (None, "5%", (100 * GI, GI), 0, 0),
            // --capacity wins, whatever the disk says.
            (Some(4 * GI), "5%", (100 * GI, GI), 0, 4 * GI),
            (Some(500 * GI), "5%", (100 * GI, 80 * GI), 0, 500 * GI),
            // Sums never overflow.
            (None, "0", (i64::MAX, i64::MAX), i64::MAX, i64::MAX),
        ];
        for (fixed, reserve, (total, available), held, want) in rows {
            let own = Own {
                promised: held,
                held,
            };
            let room = Room::plan(policy(fixed, reserve), Disk { total, available }, own);
            assert_eq!(
                room.capacity, want,
                "{fixed:?} {reserve} {total} {available} {held}"
            );
        }
    }

    #[test]
    fn capacity_holds_steady_as_our_sparse_images_fill() {
        let p = policy(None, "5%");
        let before = Room::plan(
            p,
            Disk {
                total: 100 * GI,
                available: 80 * GI,
            },
            Own::default(),
        );
        // A 20Gi image written full: 20Gi less free, 20Gi more held.
        let own = Own {
            promised: 20 * GI,
            held: 20 * GI,
        };
        let after = Room::plan(
            p,
            Disk {
                total: 100 * GI,
                available: 60 * GI,
            },
            own,
        );
        assert_eq!(before.capacity, after.capacity);
    }

    #[test]
    fn pressure_below_the_reserve_and_not_at_it() {
        let p = policy(Some(GI), "8Mi");
        let at = |available| {
            Room::plan(
                p,
                Disk {
                    total: 64 << 20,
                    available,
                },
                Own::default(),
            )
        };
        assert_eq!(at(9 << 20).pressure(), None);
        assert_eq!(at(8 << 20).pressure(), None);
        let under = at((8 << 20) - 1).pressure().unwrap();
        assert_eq!(under.available, (8 << 20) - 1);
        assert_eq!(under.reserve, 8 << 20);
        let message = under.to_string();
        assert!(
            message.contains("8388607 bytes free") && message.contains("8388608"),
            "{message}"
        );
    }

    /// Each row: capacity, promised by images present, current, wanted, result.
    #[test]
    fn growth_fits_within_what_is_not_promised_yet() {
        use RoomError::*;
        let rows = [
            // A new volume.
            (10 * GI, 0, 0, 10 * GI, Ok(())),
            (10 * GI, 4 * GI, 0, 6 * GI, Ok(())),
            (
                10 * GI,
                4 * GI,
                0,
                7 * GI,
                Err(NoRoom {
                    more: 7 * GI,
                    unpromised: 6 * GI,
                    capacity: 10 * GI,
                }),
            ),
            // Growing one already counted in what is promised.
            (10 * GI, 4 * GI, 2 * GI, 8 * GI, Ok(())),
            (
                10 * GI,
                4 * GI,
                2 * GI,
                8 * GI + 1,
                Err(NoRoom {
                    more: 6 * GI + 1,
                    unpromised: 6 * GI,
                    capacity: 10 * GI,
                }),
            ),
            (
                10 * GI,
                4 * GI,
                2 * GI,
                11 * GI,
                Err(BeyondCapacity {
                    wanted: 11 * GI,
                    capacity: 10 * GI,
                }),
            ),
            // Not growing is always fine, even on an overfull node.
            (GI, 5 * GI, 2 * GI, 2 * GI, Ok(())),
            (GI, 5 * GI, 2 * GI, GI, Ok(())),
            // Promises beyond capacity leave no room, not negative room.
            (
                4 * GI,
                5 * GI,
                0,
                1,
                Err(NoRoom {
                    more: 1,
                    unpromised: 0,
                    capacity: 4 * GI,
                }),
            ),
            (i64::MAX, 0, 0, i64::MAX, Ok(())),
        ];
        for (capacity, promised, current, wanted, want) in rows {
            let room = Room {
                disk: Disk::default(),
                own: Own { promised, held: 0 },
                reserve: 0,
                capacity,
            };
            assert_eq!(
                room.check_growth(current, wanted),
                want,
                "{capacity} {promised} {current} {wanted}"
            );
        }
    }
}
