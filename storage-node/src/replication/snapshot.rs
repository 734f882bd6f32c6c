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
use tern_common::{chunk_group, CHUNK_SIZE, META_GROUP};
use tokio::sync::mpsc;

use super::state_machine::GroupEpochs;
use super::Vote;
use crate::epoch::Epochs;
use crate::error::{Error, Result};
use crate::meta::{Entry, Version, VolumeRecord};
use crate::store::{ChunkStore, Volume};

/// One record of a snapshot stream.
#[derive(Debug, Serialize, Deserialize)]
pub enum Record {
    /// Meta group: the whole volume table.
    Volumes(Vec<VolumeRecord>),
    /// Data group: the records up to the next `Chunk` belong to this chunk (every version
    /// of its blocks; the receiver wipes the chunk first).
    Chunk { volume: u64, chunk: u32 },
    /// The versions at `epoch` of consecutive data blocks from block `first`.
    Blocks { first: u32, epoch: u64, data: Bytes },
    /// The versions at `epoch` of `n` consecutive blocks from `first`: allocated zeros, or
    /// discards (holes over older versions).
    Entries { first: u32, epoch: u64, n: u32, discarded: bool },
    /// Data group: its volumes' fencing generations (volume, generation).
    Fences(Vec<(u64, u64)>),
    /// Data group: its volumes' epoch states (snapshots), sent before any chunk.
    Epochs(Vec<(u64, Epochs)>),
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
    let placement = v.placement();
    (0..n).filter(move |&c| chunk_group(placement, u64::from(c), groups) == group)
}

/// Streams `group`'s current state as encoded parts (`Vec<Record>` each) into `tx`.
pub async fn stream_group(
    store: &ChunkStore,
    group: u32,
    groups: u32,
    epochs: &GroupEpochs,
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
    // replayed after it raise them further. Epoch states likewise: snapshot entries replayed
    // after it are idempotent, and writes they refuse are already in the chunks sent.
    let fences = store.meta().fences(group)?;
    if !fences.is_empty() {
        parts.push(Record::Fences(fences), 0).await?;
    }
    let states: Vec<(u64, Epochs)> =
        epochs.lock().iter().map(|(v, e)| (*v, Epochs::clone(e))).collect();
    parts.push(Record::Epochs(states), 0).await?;
    for v in store.list() {
        let rec = v.record();
        if rec.storage_class != "replicated" {
            continue;
        }
        for chunk in group_chunks(&rec, group, groups) {
            sent += stream_chunk(store, &v, chunk, &mut parts).await?;
        }
    }
    parts.flush().await?;
    Ok(sent)
}

/// Streams every version of one chunk; returns the data bytes sent. A version reclaimed or
/// overwritten while it is read (its slot reused) shows as a checksum mismatch: the chunk is
/// then sent again from a fresh view (the receiver wipes it at each `Chunk` record).
async fn stream_chunk(
    store: &ChunkStore,
    v: &Volume,
    chunk: u32,
    parts: &mut Parts,
) -> Result<u64> {
    const ATTEMPTS: usize = 8;
    let mut sent = 0;
    'attempt: for attempt in 1..=ATTEMPTS {
        let mut versions: Vec<Version> = store.chunk_versions(v, chunk).await?;
        if versions.is_empty() {
            return Ok(sent);
        }
        parts.push(Record::Chunk { volume: v.id.0, chunk }, 0).await?;
        // By epoch, then block: runs of consecutive blocks of one kind at one epoch.
        versions.sort_by_key(|&(b, e, _)| (e, b));
        let mut i = 0;
        while i < versions.len() {
            let (first, epoch, entry) = versions[i];
            let kind = |e: &Entry| std::mem::discriminant(e);
            let mut j = i + 1;
            while j < versions.len()
                && versions[j].1 == epoch
                && versions[j].0 == first + (j - i) as u32
                && kind(&versions[j].2) == kind(&entry)
                && (j - i) < RUN_BLOCKS as usize
            {
                j += 1;
            }
            let n = (j - i) as u32;
            match entry {
                Entry::Data { .. } => {
                    let entries: Vec<Entry> = versions[i..j].iter().map(|x| x.2).collect();
                    match store.read_entries(v, chunk, &entries).await? {
                        Some(data) => {
                            sent += data.len() as u64;
                            let size = data.len();
                            let r = Record::Blocks { first, epoch, data: Bytes::from(data) };
                            parts.push(r, size).await?;
                        }
                        None if attempt < ATTEMPTS => continue 'attempt,
                        None => {
                            return Err(Error::Unavailable(format!(
                                "chunk {chunk} of volume {} kept changing under the transfer",
                                v.id
                            )))
                        }
                    }
                }
                Entry::Zero | Entry::Discarded => {
                    let discarded = entry == Entry::Discarded;
                    parts.push(Record::Entries { first, epoch, n, discarded }, 0).await?;
                }
                Entry::Hole => {}
            }
            i = j;
        }
        return Ok(sent);
    }
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
/// It covers every version some epoch reads (versions awaiting reclaim are skipped, and a
/// discard with nothing below it counts as no version: both read alike).
pub async fn digest_group(
    store: &ChunkStore,
    group: u32,
    groups: u32,
    epochs: &GroupEpochs,
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
        let state = epochs.lock().get(&rec.id).map(|e| Epochs::clone(e)).unwrap_or_default();
        eat(&super::encode(&(rec.id, &state.snapshots, state.floor)));
        for chunk in group_chunks(&rec, group, groups) {
            let before = blocks;
            let versions = store.chunk_versions(&v, chunk).await?;
            let mut i = 0;
            while i < versions.len() {
                let b = versions[i].0;
                let mut kept: Vec<(u64, Entry)> = vec![(versions[i].1, versions[i].2)];
                let mut next = versions[i].1;
                i += 1;
                while i < versions.len() && versions[i].0 == b {
                    let (_, epoch, entry) = versions[i];
                    if state.needed(epoch, next) {
                        kept.push((epoch, entry));
                        next = epoch;
                    }
                    i += 1;
                }
                while kept.last().is_some_and(|(_, e)| *e == Entry::Discarded) {
                    kept.pop();
                }
                for (epoch, e) in kept {
                    let (kind, crc) = match e {
                        Entry::Hole => continue,
                        Entry::Zero => (1u8, 0u32),
                        Entry::Discarded => (3u8, 0u32),
                        Entry::Data { crc, .. } => {
                            blocks += 1;
                            (2u8, crc)
                        }
                    };
                    eat(&rec.id.to_le_bytes());
                    eat(&chunk.to_le_bytes());
                    eat(&b.to_le_bytes());
                    eat(&epoch.to_le_bytes());
                    eat(&[kind]);
                    eat(&crc.to_le_bytes());
                }
            }
            if blocks > before {
                detail += &format!("{}/{chunk}:{} ", rec.id, blocks - before);
            }
        }
    }
    Ok((h, blocks, detail))
}
