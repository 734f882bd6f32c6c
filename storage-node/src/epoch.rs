//! Epochs: the versions of a volume's blocks, on which snapshots stand.
//!
//! Every block version carries the epoch it was written at (the block key's last field). A
//! volume's writes go to its *head epoch*; a snapshot freezes the head epoch `S` and the
//! volume moves on to `S + 1`. A read at snapshot `S` sees, for each block, the newest
//! version at or below `S`; a read of the head sees the newest version.
//!
//! A write at epoch `e` to a block whose newest version is at `c < e` keeps that version when
//! something may still read it: a live snapshot in `[c, e)`, or an epoch in that range that
//! this chunk group has not heard of yet as a snapshot (a frontend that learned of a new
//! snapshot from one group may write to another group before that group applied it). Else
//! the old version is replaced.
//!
//! The decisions depend only on the group's log (snapshot entries and the writes' epochs,
//! both in it), so every replica keeps exactly the same versions. Reclaiming versions a
//! deleted snapshot alone held runs in the background; it changes nothing any read can see.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// The first head epoch of a volume; epoch 0 holds what was written before epochs existed
/// (it is never a snapshot).
pub const FIRST_EPOCH: u64 = 1;

/// How far ahead of a group's floor a write's epoch may be: a frontend knows at most the
/// epoch of the snapshot being created, one past what every group applied.
pub const MAX_EPOCH_LEAD: u64 = 16;

/// A volume's epoch state in one chunk group (persisted under the group's epoch key, and
/// changed only by applying the group's log).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Epochs {
    /// One past the newest snapshot this group applied (created or deleted): epochs at or
    /// above it may still become snapshots.
    pub known: u64,
    /// Writes carrying an older epoch are refused (their writer learns the newer one and
    /// sends them again). Never below `known`; raised by writes with a newer epoch.
    pub floor: u64,
    /// Live snapshots.
    pub snapshots: BTreeSet<u64>,
    /// Deleted snapshots whose versions are still being reclaimed.
    pub collecting: BTreeSet<u64>,
}

impl Default for Epochs {
    fn default() -> Self {
        Self {
            known: FIRST_EPOCH,
            floor: FIRST_EPOCH,
            snapshots: BTreeSet::new(),
            collecting: BTreeSet::new(),
        }
    }
}

/// Why a write's epoch was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EpochRefusal {
    /// A snapshot was taken since: write again at `floor`.
    Stale { floor: u64 },
    /// No frontend can know this epoch.
    Unknown { floor: u64 },
}

impl Epochs {
    /// The epoch a write asking for `asked` goes to (0: whatever the head is, for writers
    /// not attached through the volume manager).
    pub fn write_epoch(&self, asked: u64) -> Result<u64, EpochRefusal> {
        if asked == 0 {
            return Ok(self.floor);
        }
        if asked < self.floor {
            return Err(EpochRefusal::Stale { floor: self.floor });
        }
        if asked > self.floor + MAX_EPOCH_LEAD {
            return Err(EpochRefusal::Unknown { floor: self.floor });
        }
        Ok(asked)
    }

    /// Whether a block version at `cur`, overwritten at `at`, must be kept: some snapshot
    /// (live, or still to come) in `[cur, at)` sees it.
    pub fn keeps(&self, cur: u64, at: u64) -> bool {
        cur < at && (self.known < at || self.snapshots.range(cur..at).next().is_some())
    }

    /// Whether a version at `epoch` whose next newer version is at `next` is still needed.
    pub fn needed(&self, epoch: u64, next: u64) -> bool {
        self.keeps(epoch, next)
    }

    /// Applies a snapshot's creation: `epoch` is frozen, writes move past it.
    pub fn snapshot(&mut self, epoch: u64) {
        self.snapshots.insert(epoch);
        self.known = self.known.max(epoch + 1);
        self.floor = self.floor.max(epoch + 1);
    }

    /// Applies a snapshot's deletion: what only it held is to be reclaimed.
    pub fn delete(&mut self, epoch: u64) {
        self.snapshots.remove(&epoch);
        self.collecting.insert(epoch);
        self.known = self.known.max(epoch + 1);
        self.floor = self.floor.max(epoch + 1);
    }

    /// Whether `epoch` is a live snapshot here.
    pub fn has(&self, epoch: u64) -> bool {
        self.snapshots.contains(&epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_refused_below_floor_and_far_ahead() {
        let mut e = Epochs::default();
        assert_eq!(e.write_epoch(0), Ok(FIRST_EPOCH));
        assert_eq!(e.write_epoch(1), Ok(1));
        e.snapshot(1);
        assert_eq!(e.write_epoch(1), Err(EpochRefusal::Stale { floor: 2 }));
        assert_eq!(e.write_epoch(2), Ok(2));
        assert_eq!(e.write_epoch(0), Ok(2));
        assert_eq!(e.write_epoch(2 + MAX_EPOCH_LEAD + 1), Err(EpochRefusal::Unknown { floor: 2 }));
    }

    #[test]
    fn keeps_versions_snapshots_see() {
        let mut e = Epochs::default();
        // No snapshot: an overwrite at the same or the next known epoch replaces.
        assert!(!e.keeps(1, 1));
        assert!(!e.keeps(0, 1));
        // A write at an epoch this group has not heard of as a snapshot keeps.
        assert!(e.keeps(1, 2));
        e.snapshot(1);
        assert!(e.keeps(1, 2));
        assert!(e.keeps(0, 2));
        assert!(!e.keeps(2, 2));
        e.snapshot(3);
        // A version at 2 seen by snapshot 3 only.
        assert!(e.keeps(2, 4));
        e.delete(3);
        assert!(!e.needed(2, 4));
        assert!(e.needed(1, 4));
        assert!(e.collecting.contains(&3));
    }
}
