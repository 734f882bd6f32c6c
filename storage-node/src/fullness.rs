//! Refusing writes before the disk fills (as Ceph's `mon_osd_full_ratio`).
//!
//! RocksDB or a data file meeting ENOSPC while a chunk group applies a committed entry is a
//! storage error, which openraft treats as fatal for that group on that node: with every
//! replica's disk full, the group stops. So a node whose data directory's filesystem is used
//! beyond `--full-ratio` (default 0.95) calls itself *full*; it tells the volume manager with
//! every heartbeat, and the manager answers whether any member of the storage cluster is
//! full. While this node or the cluster is full, client writes (new data) are refused with
//! RESOURCE_EXHAUSTED (NBD ENOSPC) before they reach a log; reads, trims, zeroing and deletes
//! go on, so space can be freed. The margin above the ratio absorbs what is in flight and the
//! heartbeat's second of delay.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};

/// Parts per million.
const PPM: u64 = 1_000_000;

pub struct Fullness {
    /// The full ratio, in parts per million of the filesystem's size.
    ratio_ppm: AtomicU64,
    /// How full the filesystem was at the last look, in parts per million.
    used_ppm: AtomicU64,
    local: AtomicBool,
    /// The volume manager's word: some member of the storage cluster is full.
    cluster: AtomicBool,
}

impl Default for Fullness {
    fn default() -> Self {
        Self {
            ratio_ppm: AtomicU64::new(950_000),
            used_ppm: AtomicU64::new(0),
            local: AtomicBool::new(false),
            cluster: AtomicBool::new(false),
        }
    }
}

impl Fullness {
    /// Sets the full ratio (`0 < ratio <= 1`).
    pub fn set_ratio(&self, ratio: f64) -> std::result::Result<(), String> {
        if !(ratio > 0.0 && ratio <= 1.0) {
            return Err(format!("--full-ratio must be in (0, 1], not {ratio}"));
        }
        self.ratio_ppm.store((ratio * PPM as f64) as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Takes a look at the filesystem: `size` bytes, `available` to the node.
    pub fn observe(&self, size: u64, available: u64) {
        if size == 0 {
            return;
        }
        let used = size.saturating_sub(available);
        let ppm = (u128::from(used) * u128::from(PPM) / u128::from(size)) as u64;
        self.used_ppm.store(ppm, Ordering::Relaxed);
        let full = ppm >= self.ratio_ppm.load(Ordering::Relaxed);
        if self.local.swap(full, Ordering::Relaxed) != full {
            if full {
                tracing::error!(
                    used = ppm as f64 / PPM as f64,
                    "the data disk is full: refusing writes"
                );
            } else {
                tracing::info!("the data disk has room again: taking writes");
            }
        }
    }

    pub fn set_cluster_full(&self, full: bool) {
        if self.cluster.swap(full, Ordering::Relaxed) != full {
            if full {
                tracing::error!("a storage node of the cluster is full: refusing writes");
            } else {
                tracing::info!("no storage node of the cluster is full: taking writes");
            }
        }
    }

    /// This node's own disk is beyond the full ratio.
    pub fn local(&self) -> bool {
        self.local.load(Ordering::Relaxed)
    }

    /// Writes are refused (this node or, by the manager's word, the cluster is full).
    pub fn refusing(&self) -> bool {
        self.local() || self.cluster.load(Ordering::Relaxed)
    }

    /// Refuses a write of new data while full.
    pub fn check_write(&self) -> Result<()> {
        if self.local() {
            let used = self.used_ppm.load(Ordering::Relaxed) as f64 / PPM as f64;
            let ratio = self.ratio_ppm.load(Ordering::Relaxed) as f64 / PPM as f64;
            return Err(Error::Full(format!(
                "this storage node's disk is {:.1}% used (full ratio {:.1}%): writes are \
                 refused until space is freed (trim, delete volumes or snapshots)",
                used * 100.0,
                ratio * 100.0
            )));
        }
        if self.cluster.load(Ordering::Relaxed) {
            return Err(Error::Full(
                "a storage node of the cluster is full: writes are refused until space is \
                 freed (trim, delete volumes or snapshots) or the node gets more room"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// Looks at the filesystem of `dir` every second.
pub async fn watch(fullness: Arc<crate::store::ChunkStore>, dir: PathBuf) {
    loop {
        if let Some(u) = crate::metrics::fs_usage(&dir) {
            fullness.fullness.observe(u.size, u.available);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_beyond_the_ratio_and_on_the_clusters_word() {
        let f = Fullness::default();
        f.observe(1000, 100); // 90% used
        assert!(!f.refusing() && f.check_write().is_ok());
        f.observe(1000, 40); // 96% used
        assert!(f.local() && f.refusing());
        assert!(matches!(f.check_write(), Err(Error::Full(m)) if m.contains("96.0%")));
        f.set_ratio(0.99).unwrap();
        f.observe(1000, 40);
        assert!(!f.refusing());
        f.set_cluster_full(true);
        assert!(f.refusing() && !f.local() && f.check_write().is_err());
        f.set_cluster_full(false);
        assert!(f.check_write().is_ok());
        assert!(
            f.set_ratio(0.0).is_err()
                && f.set_ratio(1.5).is_err()
                && f.set_ratio(f64::NAN).is_err()
        );
    }
}
