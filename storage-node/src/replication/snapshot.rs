//! Chunk group snapshots: how a replica too far behind for the log (or a new one) gets a
//! group's whole state.
//!
//! The state machine is the chunk store itself, already persistent, so *building* a snapshot
//! only records its meta (last applied log id, membership): that is what lets openraft purge
//! the log. *Sending* one streams the group's live state from the chunk store: every chunk of
//! the group (its data blocks and zero entries), or for the meta group the volume table. The
//! stream may include writes applied after the snapshot's last log id; that is harmless,
//! because every command is a per-block overwrite (or an idempotent volume change) and the
//! receiver replays the log from that id on, ending in the same state (a "fuzzy" snapshot,
//! as ZooKeeper's).
//!
//! The receiver stages the stream in a file under `<data dir>/snapshots/` and installs it on
//! the state machine's worker (so no apply of older entries interleaves): each chunk the
//! snapshot lists is wiped and rewritten, each chunk of the group it does not list is wiped.
//! A crash during installation leaves the old applied id, and the leader sends the snapshot
//! again (this replica's log is still behind the leader's purge point).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tern_common::{chunk_group, BLOCK_SIZE, CHUNK_SIZE, META_GROUP};
use tokio::sync::mpsc;

use super::Vote;
use crate::error::{Error, Result};
use crate::meta::{Entry, VolumeRecord};
use crate::store::ChunkStore;

/// One record of a snapshot stream.
#[derive(Debug, Serialize, Deserialize)]
pub enum Record {
    /// Meta group: the whole volume table.
    Volumes(Vec<VolumeRecord>),
    /// Data group: the records up to the next `Chunk` belong to this chunk.
    Chunk { volume: u64, chunk: u32 },
    /// Consecutive data blocks from block `first` of the current chunk.
    Blocks { first: u32, data: Bytes },
    /// Consecutive zero entries (allocated zeros, no data).
    Zeros { first: u32, n: u32 },
    /// Data group: its volumes' fencing generations (volume, generation).
    Fences(Vec<(u64, u64)>),
}

/// The first part of a snapshot transfer.
#[derive(Debug, Serialize, Deserialize)]
pub struct Header {
    pub vote: Vote,
    pub meta: openraft::SnapshotMeta<u64, super::Member>,
}

/// Snapshot "data" as openraft carries it: a staged file for a received snapshot, nothing for
/// one built here (the live chunk store is its data).
#[derive(Debug, Default)]
pub struct SnapshotFile {
    pub path: Option<PathBuf>,
}

/// Records per stream part: about 1 MiB of data.
const PART_BYTES: usize = 1 << 20;
/// Data blocks per `Blocks` record at most.
const RUN_BLOCKS: u32 = 256;

/// Collects records into parts of about [`PART_BYTES`] and sends them (encoded) to `tx`.
struct Parts {
    tx: mpsc::Sender<Vec<u8>>,
    records: Vec<Record>,
    bytes: usize,
}

impl Parts {
    async fn push(&mut self, r: Record, size: usize) -> Result<()> {
        self.records.push(r);
        self.bytes += size + 16;
        if self.bytes >= PART_BYTES {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        if self.records.is_empty() {
            return Ok(());
        }
        let part = super::encode(&std::mem::take(&mut self.records));
        self.bytes = 0;
        self.tx
            .send(part)
            .await
            .map_err(|_| Error::Unavailable("snapshot receiver went away".into()))
    }
}

/// The chunks of `group` among the volume's chunks.
pub(crate) fn group_chunks(
    v: &VolumeRecord,
    group: u32,
    groups: u32,
) -> impl Iterator<Item = u32> + '_ {
    let n = v.size.div_ceil(CHUNK_SIZE) as u32;
    (0..n).filter(move |&c| chunk_group(v.id, u64::from(c), groups) == group)
}

/// Streams `group`'s current state as encoded parts (`Vec<Record>` each) into `tx`.
pub async fn stream_group(
    store: &ChunkStore,
    group: u32,
    groups: u32,
    tx: mpsc::Sender<Vec<u8>>,
) -> Result<u64> {
    let mut parts = Parts { tx, records: Vec::new(), bytes: 0 };
    let mut sent = 0u64;
    if group == META_GROUP {
        let recs: Vec<VolumeRecord> = store.list().iter().map(|v| v.record()).collect();
        parts.push(Record::Volumes(recs), 0).await?;
        parts.flush().await?;
        return Ok(0);
    }
    // Fences only rise, so sending them first is right for a fuzzy snapshot too: entries
    // replayed after it raise them further.
    let fences = store.meta().fences(group)?;
    if !fences.is_empty() {
        parts.push(Record::Fences(fences), 0).await?;
    }
    for v in store.list() {
        let rec = v.record();
        if rec.storage_class != "replicated" {
            continue;
        }
        for chunk in group_chunks(&rec, group, groups) {
            let map = store.chunk_map(&v, chunk).await?;
            if map.iter().all(|e| *e == Entry::Hole) {
                continue;
            }
            parts.push(Record::Chunk { volume: rec.id, chunk }, 0).await?;
            let base = u64::from(chunk) * CHUNK_SIZE;
            let mut b = 0u32;
            while (b as usize) < map.len() {
                let first = b;
                match map[b as usize] {
                    Entry::Hole => b += 1,
                    Entry::Zero => {
                        while (b as usize) < map.len() && map[b as usize] == Entry::Zero {
                            b += 1;
                        }
                        parts.push(Record::Zeros { first, n: b - first }, 0).await?;
                    }
                    Entry::Data { .. } => {
                        while (b as usize) < map.len()
                            && matches!(map[b as usize], Entry::Data { .. })
                            && b - first < RUN_BLOCKS
                        {
                            b += 1;
                        }
                        let off = base + u64::from(first) * BLOCK_SIZE;
                        let len = u64::from(b - first) * BLOCK_SIZE;
                        // Read with checksum verification: a corrupt block fails the transfer
                        // rather than spread.
                        let data = store.read(&v, off, len).await?;
                        sent += len;
                        parts.push(Record::Blocks { first, data }, len as usize).await?;
                    }
                }
            }
        }
    }
    parts.flush().await?;
    Ok(sent)
}

/// Appends one part to a staging file (length-prefixed).
pub fn write_part(f: &mut std::fs::File, part: &[u8]) -> std::io::Result<()> {
    f.write_all(&(part.len() as u32).to_le_bytes())?;
    f.write_all(part)
}

/// Reads the parts of a staging file back, in order.
pub fn read_parts(
    path: &Path,
) -> std::io::Result<impl Iterator<Item = std::io::Result<Vec<Record>>>> {
    let mut f = std::io::BufReader::new(std::fs::File::open(path)?);
    Ok(std::iter::from_fn(move || {
        let mut len = [0u8; 4];
        match f.read_exact(&mut len) {
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
            Err(e) => return Some(Err(e)),
            Ok(()) => {}
        }
        let mut buf = vec![0u8; u32::from_le_bytes(len) as usize];
        if let Err(e) = f.read_exact(&mut buf) {
            return Some(Err(e));
        }
        Some(super::decode::<Vec<Record>>(&buf).map_err(std::io::Error::other))
    }))
}

/// Where received snapshots are staged; emptied at start-up (a transfer cut short by a crash
/// is simply sent again).
pub fn staging_dir(store: &ChunkStore) -> PathBuf {
    store.data_dir().join("snapshots")
}

pub fn clear_staging(store: &ChunkStore) {
    let dir = staging_dir(store);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::create_dir_all(&dir);
}

/// A digest of `group`'s state in this store: equal on replicas that applied the same entries.
pub async fn digest_group(
    store: &ChunkStore,
    group: u32,
    groups: u32,
) -> Result<(u64, u64, String)> {
    let mut detail = String::new();
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(PRIME);
        }
    };
    let mut blocks = 0u64;
    if group == META_GROUP {
        let mut recs: Vec<VolumeRecord> = store.list().iter().map(|v| v.record()).collect();
        recs.sort_by_key(|r| r.id);
        for r in recs {
            eat(&super::encode(&(r.id, &r.name, r.size, r.read_only)));
        }
        return Ok((h, 0, detail));
    }
    let mut vols = store.list();
    vols.sort_by_key(|v| v.id.0);
    for v in vols {
        let rec = v.record();
        if rec.storage_class != "replicated" {
            continue;
        }
        for chunk in group_chunks(&rec, group, groups) {
            let before = blocks;
            for (b, e) in store.chunk_map(&v, chunk).await?.into_iter().enumerate() {
                let (kind, crc) = match e {
                    Entry::Hole => continue,
                    Entry::Zero => (1u8, 0u32),
                    Entry::Data { crc, .. } => {
                        blocks += 1;
                        (2u8, crc)
                    }
                };
                eat(&rec.id.to_le_bytes());
                eat(&chunk.to_le_bytes());
                eat(&(b as u32).to_le_bytes());
                eat(&[kind]);
                eat(&crc.to_le_bytes());
            }
            if blocks > before {
                detail += &format!("{}/{chunk}:{} ", rec.id, blocks - before);
            }
        }
    }
    Ok((h, blocks, detail))
}
