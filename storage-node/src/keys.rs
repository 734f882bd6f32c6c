//! The RocksDB key space of a storage node. **This module is the only one that builds or
//! parses keys.**
//!
//! Every key is a prefix byte followed by big-endian fields, so that RocksDB's byte order is
//! the numeric order of the ids and a volume's (or a chunk's) keys form one contiguous range:
//!
//! | prefix | key                                              | value                       |
//! |--------|--------------------------------------------------|-----------------------------|
//! | `0x00` | `0x00 | name`                                    | node metadata (counters)    |
//! | `0x01` | `0x01 | volume id u64`                           | volume record (JSON)        |
//! | `0x02` | `0x02 | volume name`                             | volume id u64               |
//! | `0x03` | `0x03 | volume u64 | chunk u32 | block u32 | !epoch u64` | block entry      |
//! | `0x10` | `0x10 | group u32 | log index u64`        | Raft log entry (bincode)    |
//! | `0x11` | `0x11 | group u32 | field u8`             | Raft group state (bincode)  |
//! | `0x12` | `0x12 | group u32 | volume u64`          | fencing generation u64      |
//! | `0x13` | `0x13 | group u32 | volume u64`          | epoch state (bincode `Epochs`) |
//!
//! Block keys carry the epoch inverted (`u64::MAX - epoch`) so that, for one block, the newest
//! version sorts first: a read at epoch E seeks to `!E` and takes the first key of that block
//! (see [`crate::epoch`]). Data written before epochs existed is at epoch 0.

pub const PREFIX_META: u8 = 0x00;
pub const PREFIX_VOLUME: u8 = 0x01;
pub const PREFIX_VOLUME_NAME: u8 = 0x02;
pub const PREFIX_BLOCK: u8 = 0x03;
pub const PREFIX_RAFT_LOG: u8 = 0x10;
pub const PREFIX_RAFT_STATE: u8 = 0x11;
/// `0x12 | group | volume` -> the volume's fencing generation in that chunk group.
pub const PREFIX_FENCE: u8 = 0x12;
/// `0x13 | group | volume` -> the volume's epoch state in that chunk group.
pub const PREFIX_EPOCHS: u8 = 0x13;

/// The fields of a Raft group's persistent state (`0x11` keys).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RaftField {
    Vote = 1,
    /// Not written any more (openraft's committed id is not persisted); reserved.
    Committed = 2,
    LastPurged = 3,
    /// The state machine's last applied log id and membership.
    Applied = 4,
    /// The meta of the group's last snapshot (the log before it may be purged).
    Snapshot = 5,
}

pub fn meta_key(name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + name.len());
    k.push(PREFIX_META);
    k.extend_from_slice(name.as_bytes());
    k
}

pub fn volume_key(volume: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = PREFIX_VOLUME;
    k[1..].copy_from_slice(&volume.to_be_bytes());
    k
}

pub fn parse_volume_key(k: &[u8]) -> Option<u64> {
    if k.len() != 9 || k[0] != PREFIX_VOLUME {
        return None;
    }
    Some(u64::from_be_bytes(k[1..9].try_into().ok()?))
}

pub fn volume_name_key(name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + name.len());
    k.push(PREFIX_VOLUME_NAME);
    k.extend_from_slice(name.as_bytes());
    k
}

/// Identifies one version of one block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct BlockKey {
    pub volume: u64,
    pub chunk: u32,
    pub block: u32,
    pub epoch: u64,
}

pub const BLOCK_KEY_LEN: usize = 1 + 8 + 4 + 4 + 8;

pub fn block_key(k: BlockKey) -> [u8; BLOCK_KEY_LEN] {
    let mut out = [0u8; BLOCK_KEY_LEN];
    out[0] = PREFIX_BLOCK;
    out[1..9].copy_from_slice(&k.volume.to_be_bytes());
    out[9..13].copy_from_slice(&k.chunk.to_be_bytes());
    out[13..17].copy_from_slice(&k.block.to_be_bytes());
    out[17..25].copy_from_slice(&(u64::MAX - k.epoch).to_be_bytes());
    out
}

pub fn parse_block_key(k: &[u8]) -> Option<BlockKey> {
    if k.len() != BLOCK_KEY_LEN || k[0] != PREFIX_BLOCK {
        return None;
    }
    Some(BlockKey {
        volume: u64::from_be_bytes(k[1..9].try_into().ok()?),
        chunk: u32::from_be_bytes(k[9..13].try_into().ok()?),
        block: u32::from_be_bytes(k[13..17].try_into().ok()?),
        epoch: u64::MAX - u64::from_be_bytes(k[17..25].try_into().ok()?),
    })
}

/// `[start, end)` covering every block key of a volume.
pub fn volume_blocks_range(volume: u64) -> (Vec<u8>, Vec<u8>) {
    let mut start = vec![PREFIX_BLOCK];
    start.extend_from_slice(&volume.to_be_bytes());
    let mut end = vec![PREFIX_BLOCK];
    match volume.checked_add(1) {
        Some(v) => end.extend_from_slice(&v.to_be_bytes()),
        None => end = vec![PREFIX_BLOCK + 1],
    }
    (start, end)
}

/// `[start, end)` covering every block key of one chunk.
pub fn chunk_blocks_range(volume: u64, chunk: u32) -> (Vec<u8>, Vec<u8>) {
    let mut start = vec![PREFIX_BLOCK];
    start.extend_from_slice(&volume.to_be_bytes());
    start.extend_from_slice(&chunk.to_be_bytes());
    let end = match chunk.checked_add(1) {
        Some(c) => {
            let mut e = vec![PREFIX_BLOCK];
            e.extend_from_slice(&volume.to_be_bytes());
            e.extend_from_slice(&c.to_be_bytes());
            e
        }
        None => volume_blocks_range(volume).1,
    };
    (start, end)
}

/// `[start, end)` of all blocks of a volume from chunk `chunk` on (for shrinking).
pub fn blocks_from_chunk_range(volume: u64, chunk: u32) -> (Vec<u8>, Vec<u8>) {
    (chunk_blocks_range(volume, chunk).0, volume_blocks_range(volume).1)
}

pub const RAFT_LOG_KEY_LEN: usize = 1 + 4 + 8;

pub fn raft_log_key(group: u32, index: u64) -> [u8; RAFT_LOG_KEY_LEN] {
    let mut k = [0u8; RAFT_LOG_KEY_LEN];
    k[0] = PREFIX_RAFT_LOG;
    k[1..5].copy_from_slice(&group.to_be_bytes());
    k[5..13].copy_from_slice(&index.to_be_bytes());
    k
}

/// `(group, index)` of a Raft log key.
pub fn parse_raft_log_key(k: &[u8]) -> Option<(u32, u64)> {
    if k.len() != RAFT_LOG_KEY_LEN || k[0] != PREFIX_RAFT_LOG {
        return None;
    }
    Some((
        u32::from_be_bytes(k[1..5].try_into().ok()?),
        u64::from_be_bytes(k[5..13].try_into().ok()?),
    ))
}

/// `[start, end)` of a group's log entries with index in `[from, to)`.
pub fn raft_log_range(
    group: u32,
    from: u64,
    to: u64,
) -> ([u8; RAFT_LOG_KEY_LEN], [u8; RAFT_LOG_KEY_LEN]) {
    (raft_log_key(group, from), raft_log_key(group, to))
}

/// `[start, end)` of all of a group's log entries.
pub fn raft_group_log_range(group: u32) -> (Vec<u8>, Vec<u8>) {
    let mut start = vec![PREFIX_RAFT_LOG];
    start.extend_from_slice(&group.to_be_bytes());
    let end = match group.checked_add(1) {
        Some(g) => {
            let mut e = vec![PREFIX_RAFT_LOG];
            e.extend_from_slice(&g.to_be_bytes());
            e
        }
        None => vec![PREFIX_RAFT_LOG + 1],
    };
    (start, end)
}

pub fn raft_state_key(group: u32, field: RaftField) -> [u8; 6] {
    let mut k = [0u8; 6];
    k[0] = PREFIX_RAFT_STATE;
    k[1..5].copy_from_slice(&group.to_be_bytes());
    k[5] = field as u8;
    k
}

pub fn fence_key(group: u32, volume: u64) -> [u8; 13] {
    group_volume_key(PREFIX_FENCE, group, volume)
}

pub fn epochs_key(group: u32, volume: u64) -> [u8; 13] {
    group_volume_key(PREFIX_EPOCHS, group, volume)
}

fn group_volume_key(prefix: u8, group: u32, volume: u64) -> [u8; 13] {
    let mut k = [0u8; 13];
    k[0] = prefix;
    k[1..5].copy_from_slice(&group.to_be_bytes());
    k[5..13].copy_from_slice(&volume.to_be_bytes());
    k
}

/// The fence keys of `group`: `[start, end)`.
pub fn fence_range(group: u32) -> ([u8; 5], [u8; 5]) {
    group_range(PREFIX_FENCE, group)
}

/// The epoch state keys of `group`: `[start, end)`.
pub fn epochs_range(group: u32) -> ([u8; 5], [u8; 5]) {
    group_range(PREFIX_EPOCHS, group)
}

fn group_range(prefix: u8, group: u32) -> ([u8; 5], [u8; 5]) {
    let mut s = [0u8; 5];
    s[0] = prefix;
    s[1..5].copy_from_slice(&group.to_be_bytes());
    let mut e = s;
    match group.checked_add(1) {
        Some(g) => e[1..5].copy_from_slice(&g.to_be_bytes()),
        None => {
            e = [prefix + 1, 0, 0, 0, 0];
        }
    }
    (s, e)
}

/// The volume of a fence key.
pub fn parse_fence_key(k: &[u8]) -> Option<u64> {
    parse_group_volume_key(PREFIX_FENCE, k)
}

/// The volume of an epoch state key.
pub fn parse_epochs_key(k: &[u8]) -> Option<u64> {
    parse_group_volume_key(PREFIX_EPOCHS, k)
}

fn parse_group_volume_key(prefix: u8, k: &[u8]) -> Option<u64> {
    if k.len() != 13 || k[0] != prefix {
        return None;
    }
    Some(u64::from_be_bytes(k[5..13].try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn newest_epoch_sorts_first() {
        let a = block_key(BlockKey { volume: 1, chunk: 2, block: 3, epoch: 7 });
        let b = block_key(BlockKey { volume: 1, chunk: 2, block: 3, epoch: 5 });
        assert!(a < b, "higher epoch must sort first");
    }

    #[test]
    fn ranges_cover_exactly() {
        let (s, e) = chunk_blocks_range(5, 9);
        let inside = block_key(BlockKey { volume: 5, chunk: 9, block: u32::MAX, epoch: 0 });
        let next = block_key(BlockKey { volume: 5, chunk: 10, block: 0, epoch: u64::MAX });
        assert!(s.as_slice() <= &inside[..] && &inside[..] < e.as_slice());
        assert!(&next[..] >= e.as_slice());
        let (s, e) = volume_blocks_range(u64::MAX);
        let k = block_key(BlockKey { volume: u64::MAX, chunk: 0, block: 0, epoch: 0 });
        assert!(s.as_slice() <= &k[..] && &k[..] < e.as_slice());
        assert!(parse_volume_key(&volume_key(42)) == Some(42));
    }

    proptest! {
        #[test]
        fn block_key_round_trips(volume: u64, chunk: u32, block: u32, epoch: u64) {
            let k = BlockKey { volume, chunk, block, epoch };
            prop_assert_eq!(parse_block_key(&block_key(k)), Some(k));
        }

        #[test]
        fn block_key_order_matches_fields(a: (u64, u32, u32, u64), b: (u64, u32, u32, u64)) {
            let ka = BlockKey { volume: a.0, chunk: a.1, block: a.2, epoch: a.3 };
            let kb = BlockKey { volume: b.0, chunk: b.1, block: b.2, epoch: b.3 };
            // Same order as (volume, chunk, block, reversed epoch).
            let by_fields = (a.0, a.1, a.2, std::cmp::Reverse(a.3))
                .cmp(&(b.0, b.1, b.2, std::cmp::Reverse(b.3)));
            prop_assert_eq!(block_key(ka).cmp(&block_key(kb)), by_fields);
        }

        #[test]
        fn raft_log_keys_round_trip_and_sort(a: (u32, u64), b: (u32, u64)) {
            prop_assert_eq!(parse_raft_log_key(&raft_log_key(a.0, a.1)), Some(a));
            prop_assert_eq!(raft_log_key(a.0, a.1).cmp(&raft_log_key(b.0, b.1)), a.cmp(&b));
            let (s, e) = raft_group_log_range(a.0);
            let k = raft_log_key(a.0, a.1);
            prop_assert!(s.as_slice() <= &k[..] && &k[..] < e.as_slice());
        }

        #[test]
        fn volume_key_order(a: u64, b: u64) {
            prop_assert_eq!(volume_key(a).cmp(&volume_key(b)), a.cmp(&b));
        }
    }
}
