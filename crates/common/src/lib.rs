//! Domain vocabulary shared by Tern's crates: the block and chunk geometry, volume names and
//! sizes (with the parsing and validation every entry point uses), logging set-up, and (with
//! the `metrics` feature) the daemons' Prometheus endpoint ([`metrics`]).
// Unsafe code only where a module says why (the runtime's epoll calls).
#![deny(unsafe_code)]

#[cfg(feature = "metrics")]
pub mod daemon;
#[cfg(feature = "metrics")]
pub mod metrics;
pub mod placement;
#[cfg(feature = "runtime")]
pub mod runtime;

use std::fmt;

/// Bytes per block: the unit of checksums and of allocation in the chunk store.
pub const BLOCK_SIZE: u64 = 4096;
/// Bytes per chunk: the unit of placement (and, later, of replication).
pub const CHUNK_SIZE: u64 = 64 * 1024 * 1024;
/// Blocks per chunk.
pub const BLOCKS_PER_CHUNK: u64 = CHUNK_SIZE / BLOCK_SIZE;
/// The largest volume: 64 TiB.
pub const MAX_VOLUME_SIZE: u64 = 64 << 40;
/// The largest single read or write the data path accepts (the NBD frontend advertises it).
pub const MAX_IO_SIZE: u64 = 32 << 20;
/// The longest volume name.
pub const MAX_NAME_LEN: usize = 64;

/// gRPC metadata on a frontend's `Io` stream: the datacenter the frontend runs in. Group
/// leaders move to where their requests come from.
pub const DATACENTER_HEADER: &str = "x-tern-datacenter";

/// The Raft group of a cluster that holds volume records. Data chunk groups are `1..=groups`.
pub const META_GROUP: u32 = 0;

/// The chunk group (Raft group) holding chunk `chunk` of volume `volume` in a cluster of
/// `groups` data groups. Consecutive chunks of a volume land in consecutive groups, so one
/// volume's I/O spreads over many groups and their leaders; the volume id picks the starting
/// group so that small volumes do not all crowd the same one. Frontends and storage nodes both
/// route by this function, so it must never change for an existing cluster.
pub fn chunk_group(volume: u64, chunk: u64, groups: u32) -> u32 {
    assert!(groups > 0, "a cluster has at least one data group");
    let start = volume.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
    1 + (start.wrapping_add(chunk) % u64::from(groups)) as u32
}

/// A range of log indexes as the half-open `[from, to)` (an empty range when `from >= to`).
pub fn index_range(range: &impl std::ops::RangeBounds<u64>) -> (u64, u64) {
    use std::ops::Bound;
    let from = match range.start_bound() {
        Bound::Included(&i) => i,
        Bound::Excluded(&i) => i.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let to = match range.end_bound() {
        Bound::Included(&i) => i.saturating_add(1),
        Bound::Excluded(&i) => i,
        Bound::Unbounded => u64::MAX,
    };
    (from, to)
}

/// Every data group holding some chunk of a volume of `size` bytes, in ascending order.
pub fn volume_groups(volume: u64, size: u64, groups: u32) -> Vec<u32> {
    let chunks = size.div_ceil(CHUNK_SIZE).max(1);
    let mut out: Vec<u32> =
        (0..chunks.min(u64::from(groups))).map(|c| chunk_group(volume, c, groups)).collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// A storage node as operators name it in flags and commands: `ID=HOST:PORT@DATACENTER`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeAddr {
    pub id: u64,
    /// `host:port` of its gRPC services.
    pub address: String,
    pub datacenter: String,
}

impl std::str::FromStr for NodeAddr {
    type Err = String;

    /// Parses `ID=HOST:PORT@DATACENTER` (a non-zero id, an address with a port, a datacenter).
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not ID=HOST:PORT@DATACENTER");
        let (id, rest) = s.split_once('=').ok_or_else(bad)?;
        let (address, datacenter) = rest.rsplit_once('@').ok_or_else(bad)?;
        let id: u64 = id.parse().map_err(|_| bad())?;
        if id == 0 || !address.contains(':') || datacenter.is_empty() {
            return Err(bad());
        }
        Ok(Self { id, address: address.into(), datacenter: datacenter.into() })
    }
}

/// A volume's identity: assigned by the store at creation, never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeId(pub u64);

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Why a name or size was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InputError {
    #[error("volume name must not be empty")]
    EmptyName,
    #[error("volume name is longer than {MAX_NAME_LEN} bytes")]
    NameTooLong,
    #[error(
        "volume name {0:?} has a character other than a-z, A-Z, 0-9, '.', '_' and '-', \
         or starts with one of '.', '-'"
    )]
    BadNameChar(String),
    #[error("size {0:?} is not a number with an optional unit (K, M, G, T; KiB, MiB, GiB, TiB)")]
    BadSize(String),
    #[error("size must not be zero")]
    ZeroSize,
    #[error("size {size} is not a multiple of {BLOCK_SIZE} bytes")]
    UnalignedSize { size: u64 },
    #[error("size {size} exceeds the maximum volume size of {MAX_VOLUME_SIZE} bytes")]
    SizeTooLarge { size: u64 },
}

/// Checks a volume name: 1 to 64 bytes of `[A-Za-z0-9._-]`, not starting with `.` or `-`
/// (names appear in NBD export names, file paths and URIs).
pub fn validate_volume_name(name: &str) -> Result<(), InputError> {
    if name.is_empty() {
        return Err(InputError::EmptyName);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(InputError::NameTooLong);
    }
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if !name.chars().all(ok_char) || name.starts_with(['.', '-']) {
        return Err(InputError::BadNameChar(name.to_string()));
    }
    Ok(())
}

/// Checks a volume size: non-zero, a whole number of blocks, at most [`MAX_VOLUME_SIZE`].
pub fn validate_volume_size(size: u64) -> Result<(), InputError> {
    if size == 0 {
        return Err(InputError::ZeroSize);
    }
    if !size.is_multiple_of(BLOCK_SIZE) {
        return Err(InputError::UnalignedSize { size });
    }
    if size > MAX_VOLUME_SIZE {
        return Err(InputError::SizeTooLarge { size });
    }
    Ok(())
}

/// Parses `1073741824`, `512M`, `1G`, `1GiB`, `2T` (binary units, case-insensitive).
pub fn parse_size(s: &str) -> Result<u64, InputError> {
    let bad = || InputError::BadSize(s.to_string());
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(bad());
    }
    let n: u64 = num.parse().map_err(|_| bad())?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(bad()),
    };
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// Formats bytes for people: `1.0 GiB`, `512.0 MiB`, `4096 B`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// Structured logging to stderr for the daemons, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn index_ranges_are_half_open() {
        assert_eq!(index_range(&(3..7)), (3, 7));
        assert_eq!(index_range(&(3..=7)), (3, 8));
        assert_eq!(index_range(&(..)), (0, u64::MAX));
        assert_eq!(index_range(&(5..)), (5, u64::MAX));
        let excluded = (std::ops::Bound::Excluded(4), std::ops::Bound::Unbounded);
        assert_eq!(index_range(&excluded), (5, u64::MAX));
    }

    #[test]
    fn names() {
        assert!(validate_volume_name("demo").is_ok());
        assert!(validate_volume_name("vm-01_disk.0").is_ok());
        assert_eq!(validate_volume_name(""), Err(InputError::EmptyName));
        assert!(validate_volume_name("a/b").is_err());
        assert!(validate_volume_name("-x").is_err());
        assert!(validate_volume_name(".x").is_err());
        assert!(validate_volume_name("é").is_err());
        assert_eq!(validate_volume_name(&"a".repeat(65)), Err(InputError::NameTooLong));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2t"), Ok(2 << 40));
        assert!(parse_size("").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("1.5G").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999999T").is_err());
        assert_eq!(validate_volume_size(0), Err(InputError::ZeroSize));
        assert_eq!(validate_volume_size(1000), Err(InputError::UnalignedSize { size: 1000 }));
        assert!(validate_volume_size(MAX_VOLUME_SIZE + BLOCK_SIZE).is_err());
        assert_eq!(format_size(1 << 30), "1.0 GiB");
    }

    proptest! {
        #[test]
        fn parse_size_round_trips_plain_numbers(n in 0u64..u64::MAX) {
            prop_assert_eq!(parse_size(&n.to_string()), Ok(n));
        }
    }
}

#[cfg(test)]
mod group_tests {
    use super::*;

    #[test]
    fn node_addresses_parse_or_say_why_not() {
        let n: NodeAddr = "4=127.0.3.2:7700@dc3".parse().unwrap();
        assert_eq!((n.id, n.address.as_str(), n.datacenter.as_str()), (4, "127.0.3.2:7700", "dc3"));
        for bad in ["", "4", "4=host@dc", "0=h:1@dc", "x=h:1@dc", "4=h:1@", "4=h:1"] {
            let e = bad.parse::<NodeAddr>().unwrap_err();
            assert!(e.contains("ID=HOST:PORT@DATACENTER"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn chunk_groups_cover_all_groups_and_stay_in_range() {
        for groups in [1u32, 3, 32, 256] {
            for volume in [1u64, 2, 77, u64::MAX] {
                let mut seen = std::collections::BTreeSet::new();
                for chunk in 0..u64::from(groups) {
                    let g = chunk_group(volume, chunk, groups);
                    assert!((1..=groups).contains(&g));
                    seen.insert(g);
                }
                // Consecutive chunks visit every group once before repeating.
                assert_eq!(seen.len(), groups as usize);
                assert_eq!(
                    volume_groups(volume, CHUNK_SIZE * u64::from(groups) * 2, groups).len(),
                    groups as usize
                );
            }
        }
        assert_eq!(volume_groups(5, 4096, 32), vec![chunk_group(5, 0, 32)]);
    }
}
