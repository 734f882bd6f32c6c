//! The chunk store: volumes, their chunks, and the read / write / zero / trim / flush /
//! block-status operations the data path needs.
//!
//! **Hot path** (`read`, `write` and what they call): no global locks (the volume registry is
//! read-locked only to clone an `Arc`), no synchronous RocksDB reads (the head block map of a
//! chunk is in memory once loaded), no per-request `info!` logging.
//!
//! # Durability
//!
//! A write is acknowledged once its data is written to a fresh slot (O_DIRECT: on the device;
//! buffered: in the page cache) and its metadata batch is in RocksDB's WAL. A killed process
//! therefore loses nothing acknowledged. Against power loss, [`ChunkStore::barrier`] makes
//! every write completed before it durable, in this order: fdatasync every data file written
//! since the last barrier, *then* fsync RocksDB's WAL (so durable metadata never points at
//! data that is not). FUA writes and NBD flushes run a barrier before they are acknowledged.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::try_join_all;
use parking_lot::{Mutex, RwLock};
use tern_common::{validate_volume_name, validate_volume_size, VolumeId, BLOCKS_PER_CHUNK};
use tern_common::{BLOCK_SIZE, CHUNK_SIZE, MAX_IO_SIZE};
use tokio::sync::OnceCell;

use crate::aligned::AlignedBuf;
use crate::chunk::{slot_runs, At, Chunk};
use crate::engine::{self, DataFile, EngineKind, IoEngine};
use crate::epoch::{Epochs, FIRST_EPOCH};
use crate::error::{Error, Result};
use crate::meta::{Entry, MetaStore, Version, VolumeRecord};

/// Data written ahead of its commit ([`ChunkStore::prewrite`]); give it to
/// [`ChunkStore::release_prewritten`] once the write's proposal ended.
pub struct Prewrite {
    chunk: Arc<Chunk>,
    id: u64,
}

#[derive(Default)]
struct PrewriteCounts {
    applied: AtomicU64,
    unused: AtomicU64,
}

/// The epoch state of a volume that has no snapshots (local volumes, and writes outside
/// the replicated path).
static NO_SNAPSHOTS: Epochs = Epochs {
    known: FIRST_EPOCH,
    floor: FIRST_EPOCH,
    snapshots: std::collections::BTreeSet::new(),
    collecting: std::collections::BTreeSet::new(),
};

/// Writes of volumes without snapshots: at the first epoch, replacing what they overwrite.
pub fn head_at() -> At<'static> {
    At::Epoch { epoch: FIRST_EPOCH, epochs: &NO_SNAPSHOTS }
}

/// A changed range between two epochs: `(offset, length, reads as zeros)`.
pub type Change = (u64, u64, bool);

const BS: u64 = BLOCK_SIZE;

/// Pending freed slots that trigger a background barrier (so overwrites without flushes do
/// not grow data files without bound): 64 MiB worth.
const PENDING_BARRIER_THRESHOLD: u64 = 16 * 1024;
/// A background barrier also runs this long after the first unsynced write.
const BARRIER_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub data_dir: PathBuf,
    pub engine: EngineKind,
    /// Ask for O_DIRECT on data files (falls back to buffered I/O where refused).
    pub direct_io: bool,
}

pub struct Volume {
    pub id: VolumeId,
    record: RwLock<VolumeRecord>,
    /// I/O holds it shared; delete and resize hold it exclusively. `true` once deleted.
    gate: tokio::sync::RwLock<bool>,
    chunks: Mutex<HashMap<u32, Arc<OnceCell<Arc<Chunk>>>>>,
    data_blocks: AtomicU64,
    dir: PathBuf,
}

impl Volume {
    pub fn record(&self) -> VolumeRecord {
        self.record.read().clone()
    }

    /// The id the volume's chunks are placed by (see `VolumeRecord::placement`).
    pub fn placement(&self) -> u64 {
        self.record.read().placement()
    }

    /// The snapshot a clone reads its unwritten blocks from.
    pub fn parent(&self) -> Option<crate::meta::Parent> {
        self.record.read().parent
    }

    /// Whether the volume's chunks are replicated by a cluster's chunk groups.
    pub fn is_replicated(&self) -> bool {
        self.record.read().storage_class == "replicated"
    }

    /// Checks an I/O request against the volume's size and mode (read-only refuses writes).
    pub fn check_io(&self, offset: u64, len: u64, write: bool) -> Result<()> {
        let rec = self.record.read();
        if write && rec.read_only {
            return Err(Error::ReadOnly { volume: self.id });
        }
        match offset.checked_add(len) {
            Some(end) if end <= rec.size => Ok(()),
            _ => Err(Error::OutOfRange { volume: self.id, offset, len, size: rec.size }),
        }
    }

    pub fn allocated_bytes(&self) -> u64 {
        self.data_blocks.load(Ordering::Relaxed) * BS
    }
}

/// What [`ChunkStore::admit`] checks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Admit {
    Read,
    Write,
    /// A replicated operation applied from the log (checked by the leader, never here).
    Apply,
}

#[derive(Default)]
struct Registry {
    by_id: BTreeMap<u64, Arc<Volume>>,
    by_name: HashMap<String, u64>,
}

/// Parameters of a volume to create.
#[derive(Clone, Debug, Default)]
pub struct NewVolume {
    /// Replicated volumes get their id from the Raft log (the index of the entry that created
    /// them, the same on every replica); `None` allocates the next local id.
    pub id: Option<u64>,
    pub name: String,
    pub size: u64,
    /// `"local"` (the default when empty) or `"replicated"`.
    pub storage_class: String,
    /// Unix seconds; `None` = now. Replicated volumes carry the leader's clock.
    pub created_at: Option<u64>,
    pub read_only: bool,
    pub tenant: String,
    pub labels: BTreeMap<String, String>,
    /// A clone's parent snapshot, and the id its chunks are placed by (see `VolumeRecord`).
    pub parent: Option<crate::meta::Parent>,
    pub placement: u64,
    /// A `local` volume on a cluster: the node holding it.
    pub home: u64,
}

pub struct ChunkStore {
    /// Whether writes are refused for want of space (see [`crate::fullness`]).
    pub fullness: crate::fullness::Fullness,
    cfg: StoreConfig,
    meta: Arc<MetaStore>,
    engine: Arc<dyn IoEngine>,
    volumes: RwLock<Registry>,
    /// Serialises volume create / resize / delete.
    admin: tokio::sync::Mutex<()>,
    /// Chunks written since the last barrier took the list.
    dirty: Mutex<Vec<Arc<Chunk>>>,
    barrier_lock: tokio::sync::Mutex<()>,
    /// Barrier tickets: requests taken, and the highest request a finished barrier covered.
    barrier_requests: AtomicU64,
    barrier_covered: AtomicU64,
    pending_slots: AtomicU64,
    /// The dirty list went from empty to non-empty.
    dirty_started: tokio::sync::Notify,
    /// Enough freed slots wait for a barrier.
    threshold_hit: tokio::sync::Notify,
    checksum_errors: AtomicU64,
    /// Blocks rewritten from a healthy replica's copy after a checksum mismatch.
    repairs: AtomicU64,
    prewrites: PrewriteCounts,
    direct_io_active: std::sync::atomic::AtomicBool,
    /// Client reads and writes seen so far (writes admitted here, whether a client's or
    /// applied from the log; reads as `note_client_read` counts them, so the scrub's do not):
    /// the background reclaim slows down while this moves (see `store_epochs::collect`).
    io_count: AtomicU64,
    /// One reclaim step at a time on the whole node, whichever groups and volumes reclaim.
    reclaim_gate: tokio::sync::Mutex<()>,
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn is_zero(b: &[u8]) -> bool {
    let words = b.chunks_exact(8);
    words.remainder().iter().all(|&x| x == 0)
        && words.into_iter().all(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes")) == 0)
}

/// Which of the whole blocks of `src` are all zeroes, and the indexes of the others (those
/// that need a slot).
fn zero_and_data_blocks(src: &[u8]) -> (Vec<bool>, Vec<usize>) {
    let zero: Vec<bool> = src.chunks_exact(BS as usize).map(is_zero).collect();
    let data = (0..zero.len()).filter(|&i| !zero[i]).collect();
    (zero, data)
}

impl ChunkStore {
    /// A store in `dir` with the synchronous engine and no O_DIRECT, for unit tests.
    #[cfg(test)]
    pub(crate) fn open_for_test(dir: &std::path::Path) -> Arc<Self> {
        Self::open(StoreConfig {
            data_dir: dir.to_path_buf(),
            engine: crate::engine::EngineKind::Sync,
            direct_io: false,
        })
        .expect("opening a test chunk store")
    }

    /// Opens (or creates) the store under `cfg.data_dir`: RocksDB in `meta/`, data files in
    /// `volumes/<id>/<chunk>.dat`.
    pub fn open(cfg: StoreConfig) -> Result<Arc<Self>> {
        let mkdir = |p: &Path| {
            std::fs::create_dir_all(p)
                .map_err(|source| Error::CreateDir { path: p.to_path_buf(), source })
        };
        mkdir(&cfg.data_dir)?;
        mkdir(&cfg.data_dir.join("volumes"))?;
        let meta = Arc::new(MetaStore::open(&cfg.data_dir.join("meta"))?);
        let counts = meta.count_data_blocks()?;
        let mut reg = Registry::default();
        for rec in meta.load_volumes()? {
            let dir = cfg.data_dir.join("volumes").join(rec.id.to_string());
            let v = Volume {
                id: VolumeId(rec.id),
                gate: tokio::sync::RwLock::new(false),
                chunks: Mutex::new(HashMap::new()),
                data_blocks: AtomicU64::new(counts.get(&rec.id).copied().unwrap_or(0)),
                dir,
                record: RwLock::new(rec.clone()),
            };
            reg.by_name.insert(rec.name.clone(), rec.id);
            reg.by_id.insert(rec.id, Arc::new(v));
        }
        // Data directories of volumes whose deletion was interrupted by a crash.
        if let Ok(rd) = std::fs::read_dir(cfg.data_dir.join("volumes")) {
            for ent in rd.flatten() {
                let known = ent
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<u64>().ok())
                    .is_some_and(|id| reg.by_id.contains_key(&id));
                if !known {
                    tracing::info!(path = %ent.path().display(), "removing orphan volume data");
                    let _ = std::fs::remove_dir_all(ent.path());
                }
            }
        }
        let engine = engine::build(cfg.engine);
        tracing::info!(
            engine = engine.name(),
            volumes = reg.by_id.len(),
            dir = %cfg.data_dir.display(),
            "chunk store open"
        );
        Ok(Arc::new(Self {
            fullness: Default::default(),
            meta,
            engine,
            volumes: RwLock::new(reg),
            admin: tokio::sync::Mutex::new(()),
            dirty: Mutex::new(Vec::new()),
            barrier_lock: tokio::sync::Mutex::new(()),
            barrier_requests: AtomicU64::new(0),
            repairs: AtomicU64::new(0),
            prewrites: PrewriteCounts::default(),
            barrier_covered: AtomicU64::new(0),
            pending_slots: AtomicU64::new(0),
            dirty_started: tokio::sync::Notify::new(),
            threshold_hit: tokio::sync::Notify::new(),
            checksum_errors: AtomicU64::new(0),
            io_count: AtomicU64::new(0),
            reclaim_gate: tokio::sync::Mutex::new(()),
            direct_io_active: std::sync::atomic::AtomicBool::new(cfg.direct_io),
            cfg,
        }))
    }

    /// The node's metadata store (shared with the Raft logs of a cluster).
    pub fn meta(&self) -> Arc<MetaStore> {
        self.meta.clone()
    }

    pub fn engine_name(&self) -> &'static str {
        self.engine.name()
    }

    pub fn direct_io(&self) -> bool {
        self.direct_io_active.load(Ordering::Relaxed)
    }

    pub fn repairs(&self) -> u64 {
        self.repairs.load(Ordering::Relaxed)
    }

    /// Rewrites the block at `offset` (block-aligned) from `data`, a healthy replica's copy,
    /// if this store's entry for the block is still data with the checksum of `data`: the same
    /// version, whose local copy is damaged. The block map entry is swapped only if it did not
    /// change meanwhile (compare-and-swap), so a concurrent write always wins. Returns whether
    /// the block was repaired.
    pub async fn repair_block(&self, v: &Volume, offset: u64, data: &[u8]) -> Result<bool> {
        if !offset.is_multiple_of(BS) || data.len() as u64 != BS {
            return Err(Error::Unsupported("repairs are whole, aligned blocks"));
        }
        let c = self.chunk(v, (offset / CHUNK_SIZE) as u32).await?;
        let block = ((offset % CHUNK_SIZE) / BS) as u32;
        let old = c.entry(block);
        let Entry::Data { crc, .. } = old else { return Ok(false) };
        if crc32c::crc32c(data) != crc {
            return Ok(false);
        }
        let slots = c.alloc(1);
        let buf = AlignedBuf::from_slice(data);
        if let Err(source) = self.engine.write_at(c.file.clone(), buf, slots[0] as u64 * BS).await {
            c.unalloc(&slots);
            return Err(Error::DataIo { volume: v.id, source });
        }
        let new = Entry::Data { slot: slots[0], crc };
        let done = c.commit(&self.meta, &[(block, new)], Some(&[old]), At::InPlace)?;
        if !done.applied {
            c.unalloc(&slots);
            return Ok(false);
        }
        self.note_committed(v, &c, done.data_delta, done.freed);
        self.repairs.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(volume = v.id.0, offset, "repaired a damaged block from another replica");
        Ok(true)
    }

    pub fn checksum_errors(&self) -> u64 {
        self.checksum_errors.load(Ordering::Relaxed)
    }

    /// Runs background barriers: after [`BARRIER_INTERVAL`] of unsynced writes, or when
    /// enough freed slots wait for one. Sleeps while nothing is dirty.
    pub fn spawn_background(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let store = self.clone();
        tokio::spawn(async move {
            loop {
                store.dirty_started.notified().await;
                tokio::select! {
                    _ = store.threshold_hit.notified() => {}
                    _ = tokio::time::sleep(BARRIER_INTERVAL) => {}
                }
                if let Err(e) = store.barrier().await {
                    tracing::error!(%e, "background barrier failed");
                }
            }
        })
    }

    // ----- volumes ---------------------------------------------------------------------

    pub fn list(&self) -> Vec<Arc<Volume>> {
        self.volumes.read().by_id.values().cloned().collect()
    }

    pub fn get(&self, id: u64) -> Result<Arc<Volume>> {
        self.volumes.read().by_id.get(&id).cloned().ok_or(Error::VolumeNotFound(id.to_string()))
    }

    pub fn get_by_name(&self, name: &str) -> Result<Arc<Volume>> {
        let reg = self.volumes.read();
        reg.by_name
            .get(name)
            .and_then(|id| reg.by_id.get(id))
            .cloned()
            .ok_or_else(|| Error::VolumeNotFound(format!("{name:?}")))
    }

    pub async fn create_volume(&self, new: NewVolume) -> Result<Arc<Volume>> {
        validate_volume_name(&new.name)?;
        validate_volume_size(new.size)?;
        let _admin = self.admin.lock().await;
        if self.volumes.read().by_name.contains_key(&new.name) {
            return Err(Error::VolumeExists(new.name));
        }
        let id = match new.id {
            Some(id) => id,
            None => self.meta.next_volume_id()?,
        };
        let rec = VolumeRecord {
            id,
            name: new.name.clone(),
            size: new.size,
            read_only: new.read_only,
            created_at: new.created_at.unwrap_or_else(now_secs),
            storage_class: if new.storage_class.is_empty() {
                "local".into()
            } else {
                new.storage_class
            },
            tenant: new.tenant,
            labels: new.labels,
            parent: new.parent,
            placement: new.placement,
            home: new.home,
        };
        let dir = self.cfg.data_dir.join("volumes").join(id.to_string());
        std::fs::create_dir_all(&dir)
            .map_err(|source| Error::CreateDir { path: dir.clone(), source })?;
        self.meta.put_volume(&rec, None)?;
        let v = Arc::new(Volume {
            id: VolumeId(id),
            record: RwLock::new(rec),
            gate: tokio::sync::RwLock::new(false),
            chunks: Mutex::new(HashMap::new()),
            data_blocks: AtomicU64::new(0),
            dir,
        });
        let mut reg = self.volumes.write();
        reg.by_name.insert(new.name, id);
        reg.by_id.insert(id, v.clone());
        tracing::info!(volume = id, name = %v.record().name, size = v.record().size, "volume created");
        Ok(v)
    }

    pub async fn delete_volume(&self, v: &Arc<Volume>) -> Result<()> {
        let _admin = self.admin.lock().await;
        let mut gate = v.gate.write().await;
        if *gate {
            return Err(Error::VolumeDeleted(v.id));
        }
        let rec = v.record();
        self.meta.delete_volume(&rec)?;
        *gate = true;
        {
            let mut reg = self.volumes.write();
            reg.by_id.remove(&v.id.0);
            reg.by_name.remove(&rec.name);
        }
        v.chunks.lock().clear();
        let dir = v.dir.clone();
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
        tracing::info!(volume = v.id.0, name = %rec.name, "volume deleted");
        Ok(())
    }

    /// Grows a volume, or shrinks it (discarding the data past the new end) if allowed.
    pub async fn resize_volume(
        &self,
        v: &Arc<Volume>,
        size: u64,
        allow_shrink: bool,
    ) -> Result<()> {
        self.resize(v, size, allow_shrink, true).await
    }

    /// Sets a volume's size without touching its blocks (a replicated volume's chunks are
    /// truncated through their groups' logs; see `Cmd::Truncate`).
    pub async fn set_size(&self, v: &Arc<Volume>, size: u64) -> Result<()> {
        self.resize(v, size, true, false).await
    }

    /// Changes the size; a shrink (if allowed) discards the blocks past the end if `discard`.
    async fn resize(
        &self,
        v: &Arc<Volume>,
        size: u64,
        allow_shrink: bool,
        discard: bool,
    ) -> Result<()> {
        validate_volume_size(size)?;
        let _admin = self.admin.lock().await;
        let gate = v.gate.write().await;
        if *gate {
            return Err(Error::VolumeDeleted(v.id));
        }
        let mut rec = v.record();
        if size < rec.size {
            if !allow_shrink {
                return Err(Error::ShrinkRefused { volume: v.id, from: rec.size, to: size });
            }
            let mut off = size;
            while discard && off < rec.size {
                let len = (rec.size - off).min(CHUNK_SIZE - off % CHUNK_SIZE);
                self.zero_segment(v, off, len, true, true, head_at()).await?;
                off += len;
            }
        }
        rec.size = size;
        self.meta.put_volume(&rec, None)?;
        *v.record.write() = rec;
        drop(gate);
        tracing::info!(volume = v.id.0, size, "volume resized");
        Ok(())
    }

    /// Forgets a clone's parent (after `copy_up` copied every inherited block).
    pub async fn clear_parent(&self, v: &Arc<Volume>) -> Result<()> {
        let _admin = self.admin.lock().await;
        let mut rec = v.record();
        rec.parent = None;
        self.meta.put_volume(&rec, None)?;
        *v.record.write() = rec;
        Ok(())
    }

    pub async fn set_read_only(&self, v: &Arc<Volume>, read_only: bool) -> Result<()> {
        let _admin = self.admin.lock().await;
        let mut rec = v.record();
        rec.read_only = read_only;
        self.meta.put_volume(&rec, None)?;
        *v.record.write() = rec;
        Ok(())
    }

    // ----- chunks ----------------------------------------------------------------------

    async fn chunk(&self, v: &Volume, index: u32) -> Result<Arc<Chunk>> {
        let cell = v.chunks.lock().entry(index).or_default().clone();
        if let Some(c) = cell.get() {
            return Ok(c.clone());
        }
        let c = cell
            .get_or_try_init(|| async {
                let meta = self.meta.clone();
                let path = v.dir.join(format!("{index}.dat"));
                let (volume, direct) = (v.id.0, self.cfg.direct_io);
                let has_parent = v.parent().is_some();
                tokio::task::spawn_blocking(move || -> Result<Chunk> {
                    let file = DataFile::open(&path, direct)
                        .map_err(|source| Error::OpenDataFile { path: path.clone(), source })?;
                    let entries = meta.load_chunk(volume, index)?;
                    Ok(Chunk::new(volume, index, Arc::new(file), entries, has_parent))
                })
                .await
                .map_err(|e| Error::DataIo { volume: v.id, source: std::io::Error::other(e) })?
                .map(Arc::new)
            })
            .await?;
        if !c.file.direct {
            self.direct_io_active.store(false, Ordering::Relaxed);
        }
        Ok(c.clone())
    }

    fn note_committed(&self, v: &Volume, c: &Arc<Chunk>, delta: i64, freed: usize) {
        if delta >= 0 {
            v.data_blocks.fetch_add(delta as u64, Ordering::Relaxed);
        } else {
            v.data_blocks.fetch_sub((-delta) as u64, Ordering::Relaxed);
        }
        if c.mark_dirty() {
            let first = {
                let mut dirty = self.dirty.lock();
                dirty.push(c.clone());
                dirty.len() == 1
            };
            if first {
                self.dirty_started.notify_one();
            }
        }
        if freed > 0
            && self.pending_slots.fetch_add(freed as u64, Ordering::Relaxed) + freed as u64
                >= PENDING_BARRIER_THRESHOLD
        {
            self.threshold_hit.notify_one();
        }
    }

    /// Checks an I/O request against the volume and takes its gate.
    /// Counts a client's read (see `io_count`).
    pub fn note_client_read(&self) {
        self.io_count.fetch_add(1, Ordering::Relaxed);
    }

    async fn admit<'a>(
        &self,
        v: &'a Volume,
        offset: u64,
        len: u64,
        mode: Admit,
    ) -> Result<tokio::sync::RwLockReadGuard<'a, bool>> {
        let gate = v.gate.read().await;
        if *gate {
            return Err(Error::VolumeDeleted(v.id));
        }
        if mode != Admit::Read {
            self.io_count.fetch_add(1, Ordering::Relaxed);
        }
        let write = match mode {
            Admit::Read => false,
            Admit::Write => true,
            // Replicated writes were checked by the group leader before they entered the log;
            // every replica applies them unconditionally so that all replicas stay identical.
            Admit::Apply => return Ok(gate),
        };
        v.check_io(offset, len, write)?;
        Ok(gate)
    }

    /// The data directory (snapshots in transfer are staged under it).
    pub fn data_dir(&self) -> &Path {
        &self.cfg.data_dir
    }

    // ----- the data path -----------------------------------------------------------------

    /// Reads `len` bytes at `offset` (any alignment). Every data block's checksum is verified;
    /// a mismatch fails the read and is counted, it never returns the wrong bytes.
    pub async fn read(&self, v: &Volume, offset: u64, len: u64) -> Result<Bytes> {
        self.read_at(v, offset, len, 0).await
    }

    /// [`Self::read`] of the volume as it was at snapshot `epoch` (0: the head). The caller
    /// checked that the snapshot exists.
    pub async fn read_at(&self, v: &Volume, offset: u64, len: u64, epoch: u64) -> Result<Bytes> {
        if len > MAX_IO_SIZE {
            return Err(Error::TooLarge { len, max: MAX_IO_SIZE });
        }
        let _gate = self.admit(v, offset, len, Admit::Read).await?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let mut out = vec![0u8; len as usize];
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let seg = (end - pos).min(CHUNK_SIZE - pos % CHUNK_SIZE);
            let dst = &mut out[(pos - offset) as usize..(pos - offset + seg) as usize];
            self.read_segment(v, pos, dst, epoch).await?;
            pos += seg;
        }
        Ok(Bytes::from(out))
    }

    /// The entries blocks `[first, first + n)` of a chunk have at snapshot `epoch` (0: the
    /// newest). Versions a snapshot sees never change while it lives: only blocks written
    /// since it need a look in RocksDB.
    async fn entries_at(&self, c: &Chunk, first: u32, n: u32, epoch: u64) -> Result<Vec<Entry>> {
        if epoch == 0 {
            return Ok(c.entries(first, n));
        }
        let heads = c.heads(first, n);
        let mut out: Vec<Entry> = heads.iter().map(|h| h.entry).collect();
        let newer: Vec<u32> = heads
            .iter()
            .enumerate()
            .filter(|(_, h)| h.entry != Entry::Hole && h.epoch > epoch)
            .map(|(i, _)| i as u32)
            .collect();
        if !newer.is_empty() {
            let meta = self.meta.clone();
            let (volume, index) = (c.volume, c.index);
            let blocks: Vec<u32> = newer.iter().map(|i| first + i).collect();
            let found = tokio::task::spawn_blocking(move || {
                meta.entries_at(volume, index, blocks.into_iter(), epoch)
            })
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
            for (i, e) in newer.into_iter().zip(found) {
                out[i as usize] = e;
            }
        }
        Ok(out)
    }

    /// Reads within one chunk into `dst`.
    async fn read_segment(
        &self,
        v: &Volume,
        offset: u64,
        dst: &mut [u8],
        epoch: u64,
    ) -> Result<()> {
        let c = self.chunk(v, (offset / CHUNK_SIZE) as u32).await?;
        let in_chunk = offset % CHUNK_SIZE;
        let first = (in_chunk / BS) as u32;
        let last = ((in_chunk + dst.len() as u64 - 1) / BS) as u32;
        let n = last - first + 1;
        let skip = (in_chunk % BS) as usize;
        // A concurrent overwrite may free and (after a barrier) reuse a slot between our
        // snapshot of the map and our read of it; a checksum mismatch on a block whose entry
        // has since changed is that race, not corruption: read again.
        // Whole blocks are read straight into `dst`; partial ones go through a scratch buffer.
        let aligned = skip == 0 && dst.len() as u64 == u64::from(n) * BS;
        let mut scratch =
            if aligned { Vec::new() } else { vec![0u8; (u64::from(n) * BS) as usize] };
        for attempt in 0.. {
            let entries = self.entries_at(&c, first, n, epoch).await?;
            let blocks: &mut [u8] = if aligned { &mut *dst } else { &mut scratch };
            self.read_blocks(v, &c, &entries, blocks).await?;
            let mut bad = None;
            for (i, e) in entries.iter().enumerate() {
                if let Entry::Data { crc, .. } = *e {
                    let data = &blocks[i * BS as usize..(i + 1) * BS as usize];
                    let got = crc32c::crc32c(data);
                    if got != crc {
                        bad = Some((i, crc, got));
                        break;
                    }
                }
            }
            match bad {
                None => {
                    if let Some(p) = v.parent() {
                        self.fill_from_parent(p, &c, first, &entries, blocks).await?;
                    }
                    if !aligned {
                        dst.copy_from_slice(&scratch[skip..skip + dst.len()]);
                    }
                    return Ok(());
                }
                Some((i, stored, computed)) => {
                    if epoch == 0 && c.entry(first + i as u32) != entries[i] && attempt < 8 {
                        continue;
                    }
                    self.checksum_errors.fetch_add(1, Ordering::Relaxed);
                    let at = v_offset(&c, first + i as u32);
                    tracing::error!(
                        volume = v.id.0,
                        offset = at,
                        stored,
                        computed,
                        "checksum mismatch: failing the read"
                    );
                    return Err(Error::ChecksumMismatch {
                        volume: v.id,
                        offset: at,
                        stored,
                        computed,
                    });
                }
            }
        }
        unreachable!("the loop returns")
    }

    /// A clone's blocks with no version read as its parent's snapshot does: fills those of
    /// `entries` (blocks from `first` of chunk `c`) into `out` from the parent (recursively,
    /// for a clone of a clone). Past the parent's end they read as zeros.
    async fn fill_from_parent(
        &self,
        p: crate::meta::Parent,
        c: &Chunk,
        first: u32,
        entries: &[Entry],
        out: &mut [u8],
    ) -> Result<()> {
        let parent = self.get(p.volume)?;
        let size = parent.record().size;
        let mut i = 0;
        while i < entries.len() {
            if entries[i] != Entry::Hole {
                i += 1;
                continue;
            }
            let mut j = i;
            while j < entries.len() && entries[j] == Entry::Hole {
                j += 1;
            }
            let off = v_offset(c, first + i as u32);
            let len = ((j - i) as u64 * BS).min(size.saturating_sub(off));
            if len > 0 {
                let data = Box::pin(self.read_at(&parent, off, len, p.epoch)).await?;
                out[i * BS as usize..i * BS as usize + data.len()].copy_from_slice(&data);
            }
            i = j;
        }
        Ok(())
    }

    /// Reads the given entries' blocks into `out` (`entries.len()` blocks long; zeros for
    /// holes and zero entries), one I/O per run of consecutive slots.
    async fn read_blocks(
        &self,
        v: &Volume,
        c: &Arc<Chunk>,
        entries: &[Entry],
        out: &mut [u8],
    ) -> Result<()> {
        for (i, e) in entries.iter().enumerate() {
            if !matches!(e, Entry::Data { .. }) {
                out[i * BS as usize..(i + 1) * BS as usize].fill(0);
            }
        }
        // Runs of consecutive slots that are also consecutive blocks.
        let runs = slot_runs(entries.iter().enumerate().filter_map(|(i, e)| match e {
            Entry::Data { slot, .. } => Some((i, *slot)),
            _ => None,
        }));
        let reads = runs.iter().map(|&(slot, _, n)| {
            self.engine.read_at(
                c.file.clone(),
                AlignedBuf::zeroed(n * BS as usize),
                slot as u64 * BS,
            )
        });
        let bufs =
            try_join_all(reads).await.map_err(|source| Error::DataIo { volume: v.id, source })?;
        for ((_, start, _), buf) in runs.iter().zip(bufs) {
            let o = start * BS as usize;
            out[o..o + buf.len()].copy_from_slice(&buf);
        }
        Ok(())
    }

    /// Writes `data` at `offset` (any alignment; sub-block edges are read-modify-written).
    /// With `fua`, the write is durable before this returns.
    pub async fn write(&self, v: &Volume, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.write_as(v, offset, data, fua, Admit::Write, head_at()).await
    }

    /// [`Self::write`] of a replicated write applied from the Raft log: not re-checked;
    /// written `at` the epoch its group decided.
    pub async fn apply_write(
        &self,
        v: &Volume,
        offset: u64,
        data: Bytes,
        at: At<'_>,
    ) -> Result<()> {
        self.write_as(v, offset, data, false, Admit::Apply, at).await
    }

    async fn write_as(
        &self,
        v: &Volume,
        offset: u64,
        data: Bytes,
        fua: bool,
        mode: Admit,
        at: At<'_>,
    ) -> Result<()> {
        let len = data.len() as u64;
        if len > MAX_IO_SIZE {
            return Err(Error::TooLarge { len, max: MAX_IO_SIZE });
        }
        let gate = self.admit(v, offset, len, mode).await?;
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let seg = (end - pos).min(CHUNK_SIZE - pos % CHUNK_SIZE);
            let src = data.slice((pos - offset) as usize..(pos - offset + seg) as usize);
            self.write_segment(v, pos, &src, at).await?;
            pos += seg;
        }
        drop(gate);
        if fua {
            self.barrier().await?;
        }
        Ok(())
    }

    async fn write_segment(&self, v: &Volume, offset: u64, src: &[u8], at: At<'_>) -> Result<()> {
        let c = self.chunk(v, (offset / CHUNK_SIZE) as u32).await?;
        let in_chunk = offset % CHUNK_SIZE;
        let end = in_chunk + src.len() as u64;
        let full_start = in_chunk.div_ceil(BS) * BS;
        let full_end = (end / BS) * BS;
        if full_start >= full_end {
            // Entirely within one or two blocks, none of them whole.
            let mut pos = in_chunk;
            while pos < end {
                let n = (BS - pos % BS).min(end - pos);
                let s = &src[(pos - in_chunk) as usize..(pos - in_chunk + n) as usize];
                self.rmw_block(v, &c, (pos / BS) as u32, (pos % BS) as usize, s, at).await?;
                pos += n;
            }
            return Ok(());
        }
        if in_chunk < full_start {
            let s = &src[..(full_start - in_chunk) as usize];
            self.rmw_block(v, &c, (in_chunk / BS) as u32, (in_chunk % BS) as usize, s, at).await?;
        }
        let mid = &src[(full_start - in_chunk) as usize..(full_end - in_chunk) as usize];
        self.write_full_blocks(v, &c, (full_start / BS) as u32, mid, at).await?;
        if full_end < end {
            let s = &src[(full_end - in_chunk) as usize..];
            self.rmw_block(v, &c, (full_end / BS) as u32, 0, s, at).await?;
        }
        Ok(())
    }

    /// Redirect-on-write of whole blocks: data to fresh slots, then one metadata commit.
    async fn write_full_blocks(
        &self,
        v: &Volume,
        c: &Arc<Chunk>,
        first: u32,
        src: &[u8],
        at: At<'_>,
    ) -> Result<()> {
        let n = src.len() / BS as usize;
        let block = |i: usize| &src[i * BS as usize..(i + 1) * BS as usize];
        let (zero, data_idx) = zero_and_data_blocks(src);
        // Written ahead by this group's leader while the entry replicated: only the block
        // map is left to do.
        let prewritten = match c.take_prewritten(first, src) {
            Some((slots, written)) => match written.await {
                Ok(true) => Some(slots),
                Ok(false) => {
                    c.unalloc(&slots);
                    None
                }
                // The prewrite was dropped, its write perhaps still under way: the slots stay
                // out of use (free again when the chunk is next loaded).
                Err(_) => None,
            },
            None => None,
        };
        let written = prewritten.is_some();
        let slots = prewritten.unwrap_or_else(|| c.alloc(data_idx.len()));
        let mut updates: Vec<(u32, Entry)> = Vec::with_capacity(n);
        let mut si = 0;
        for (i, &z) in zero.iter().enumerate() {
            let e = if z {
                Entry::Zero
            } else {
                let e = Entry::Data { slot: slots[si], crc: crc32c::crc32c(block(i)) };
                si += 1;
                e
            };
            updates.push((first + i as u32, e));
        }
        if !written {
            self.write_to_slots(v, c, &slots, |i| block(data_idx[i])).await?;
        }
        match c.commit(&self.meta, &updates, None, at) {
            Ok(done) => {
                self.note_committed(v, c, done.data_delta, done.freed);
                Ok(())
            }
            Err(e) => {
                c.unalloc(&slots);
                Err(e)
            }
        }
    }

    /// A group leader writes a replicated write's data ahead of its commit, while the log
    /// entry replicates, so that applying the entry leaves only the block map to update (the
    /// data write is off the write's critical path). The data goes to free slots that no block
    /// map entry references, so nothing reads it before the commit; applying the entry takes
    /// the slots ([`Chunk::take_prewritten`], matched by position and bytes), and the
    /// proposer gives back whatever the apply did not take ([`Self::release_prewritten`]).
    /// A crash in between leaves the slots unreferenced: free again when the chunk is loaded.
    ///
    /// Only for whole blocks within one chunk; `None` when not done (nothing to give back).
    pub async fn prewrite(&self, v: &Volume, offset: u64, data: &Bytes) -> Option<Prewrite> {
        let len = data.len() as u64;
        let chunk = offset / CHUNK_SIZE;
        if len == 0
            || !offset.is_multiple_of(BS)
            || !len.is_multiple_of(BS)
            || (offset + len - 1) / CHUNK_SIZE != chunk
        {
            return None;
        }
        v.check_io(offset, len, true).ok()?;
        let c = self.chunk(v, chunk as u32).await.ok()?;
        let block = |i: usize| &data[i * BS as usize..(i + 1) * BS as usize];
        // The same split as the apply's (`write_full_blocks`), so the slots match its blocks.
        let (_, data_idx) = zero_and_data_blocks(data);
        if data_idx.is_empty() {
            return None;
        }
        let slots = c.alloc(data_idx.len());
        let first = ((offset % CHUNK_SIZE) / BS) as u32;
        // Known before the write starts: an apply that comes first waits for it rather than
        // writing the data again.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let id = c.add_prewritten(first, data.clone(), slots.clone(), rx);
        // The proposal's messages go out first.
        tokio::task::yield_now().await;
        let _ = tx.send(self.write_slots(&c, &slots, |i| block(data_idx[i])).await.is_ok());
        Some(Prewrite { chunk: c, id })
    }

    /// Gives back the slots of a prewrite that no apply took.
    pub fn release_prewritten(&self, p: Prewrite) {
        let counter = if p.chunk.release_prewritten(p.id) {
            &self.prewrites.unused
        } else {
            &self.prewrites.applied
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Prewrites so far: (taken by their apply, given back unused).
    pub fn prewrites(&self) -> (u64, u64) {
        let p = &self.prewrites;
        (p.applied.load(Ordering::Relaxed), p.unused.load(Ordering::Relaxed))
    }

    /// Writes `block(i)` (4 KiB each) to `slots[i]` of chunk `c` for every `i`, one I/O per
    /// run of consecutive slots; on failure the slots are given back.
    async fn write_to_slots<'a>(
        &self,
        v: &Volume,
        c: &Chunk,
        slots: &[u32],
        block: impl Fn(usize) -> &'a [u8],
    ) -> Result<()> {
        if let Err(source) = self.write_slots(c, slots, block).await {
            c.unalloc(slots);
            return Err(Error::DataIo { volume: v.id, source });
        }
        Ok(())
    }

    /// [`Self::write_to_slots`] without giving the slots back on failure.
    async fn write_slots<'a>(
        &self,
        c: &Chunk,
        slots: &[u32],
        block: impl Fn(usize) -> &'a [u8],
    ) -> std::io::Result<()> {
        let runs = slot_runs(slots.iter().copied().enumerate());
        let writes = runs.iter().map(|&(slot, start, count)| {
            let mut buf = AlignedBuf::zeroed(count * BS as usize);
            for k in 0..count {
                buf[k * BS as usize..(k + 1) * BS as usize].copy_from_slice(block(start + k));
            }
            self.engine.write_at(c.file.clone(), buf, slot as u64 * BS)
        });
        try_join_all(writes).await.map(|_| ())
    }

    /// Read-modify-write of part of one block: `bytes` land at `within`. Optimistic: the
    /// commit applies only if the block still holds what was read, else it starts over.
    async fn rmw_block(
        &self,
        v: &Volume,
        c: &Arc<Chunk>,
        block: u32,
        within: usize,
        bytes: &[u8],
        at: At<'_>,
    ) -> Result<()> {
        loop {
            let old = c.entry(block);
            let inherited = old == Entry::Hole && c.has_parent;
            if matches!(old, Entry::Hole | Entry::Zero | Entry::Discarded)
                && !inherited
                && is_zero(bytes)
            {
                return Ok(()); // zeros over zeros: nothing to do
            }
            let mut merged = vec![0u8; BS as usize];
            self.read_blocks(v, c, &[old], &mut merged).await?;
            if inherited {
                if let Some(p) = v.parent() {
                    self.fill_from_parent(p, c, block, &[old], &mut merged).await?;
                }
            }
            if let Entry::Data { crc, .. } = old {
                let got = crc32c::crc32c(&merged);
                if got != crc {
                    if c.entry(block) != old {
                        continue;
                    }
                    self.checksum_errors.fetch_add(1, Ordering::Relaxed);
                    let offset = v_offset(c, block);
                    return Err(Error::ChecksumMismatch {
                        volume: v.id,
                        offset,
                        stored: crc,
                        computed: got,
                    });
                }
            }
            merged[within..within + bytes.len()].copy_from_slice(bytes);
            let (new, slots) = if is_zero(&merged) {
                (Entry::Zero, Vec::new())
            } else {
                let slots = c.alloc(1);
                let buf = AlignedBuf::from_slice(&merged);
                if let Err(source) =
                    self.engine.write_at(c.file.clone(), buf, slots[0] as u64 * BS).await
                {
                    c.unalloc(&slots);
                    return Err(Error::DataIo { volume: v.id, source });
                }
                (Entry::Data { slot: slots[0], crc: crc32c::crc32c(&merged) }, slots)
            };
            match c.commit(&self.meta, &[(block, new)], Some(&[old]), at) {
                Ok(done) if done.applied => {
                    self.note_committed(v, c, done.data_delta, done.freed);
                    return Ok(());
                }
                Ok(_) => c.unalloc(&slots), // raced with another write: again
                Err(e) => {
                    c.unalloc(&slots);
                    return Err(e);
                }
            }
        }
    }

    /// Zeroes `[offset, offset + len)`. Whole blocks become holes (`punch`) or zero entries;
    /// partial edges are read-modify-written with zeros.
    pub async fn write_zeroes(
        &self,
        v: &Volume,
        offset: u64,
        len: u64,
        punch: bool,
        fua: bool,
    ) -> Result<()> {
        self.write_zeroes_as(v, offset, len, punch, fua, Admit::Write, head_at()).await
    }

    /// [`Self::write_zeroes`] applied from the Raft log: not re-checked.
    pub async fn apply_write_zeroes(
        &self,
        v: &Volume,
        offset: u64,
        len: u64,
        punch: bool,
        at: At<'_>,
    ) -> Result<()> {
        self.write_zeroes_as(v, offset, len, punch, false, Admit::Apply, at).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn write_zeroes_as(
        &self,
        v: &Volume,
        offset: u64,
        len: u64,
        punch: bool,
        fua: bool,
        mode: Admit,
        at: At<'_>,
    ) -> Result<()> {
        let gate = self.admit(v, offset, len, mode).await?;
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let seg = (end - pos).min(CHUNK_SIZE - pos % CHUNK_SIZE);
            self.zero_segment(v, pos, seg, punch, false, at).await?;
            pos += seg;
        }
        drop(gate);
        if fua {
            self.barrier().await?;
        }
        Ok(())
    }

    /// Discards the whole blocks of `[offset, offset + len)`; they read back as zeros.
    /// Partial blocks at the edges are left alone (trim is advisory).
    pub async fn trim(&self, v: &Volume, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.trim_as(v, offset, len, fua, Admit::Write, head_at()).await
    }

    /// [`Self::trim`] applied from the Raft log: not re-checked.
    pub async fn apply_trim(&self, v: &Volume, offset: u64, len: u64, at: At<'_>) -> Result<()> {
        self.trim_as(v, offset, len, false, Admit::Apply, at).await
    }

    async fn trim_as(
        &self,
        v: &Volume,
        offset: u64,
        len: u64,
        fua: bool,
        mode: Admit,
        at: At<'_>,
    ) -> Result<()> {
        let gate = self.admit(v, offset, len, mode).await?;
        let start = offset.div_ceil(BS) * BS;
        let end = ((offset + len) / BS) * BS;
        let mut pos = start;
        while pos < end {
            let seg = (end - pos).min(CHUNK_SIZE - pos % CHUNK_SIZE);
            self.zero_segment(v, pos, seg, true, true, at).await?;
            pos += seg;
        }
        drop(gate);
        if fua {
            self.barrier().await?;
        }
        Ok(())
    }

    /// Zeroes within one chunk. `whole_only` skips partial edge blocks.
    async fn zero_segment(
        &self,
        v: &Volume,
        offset: u64,
        len: u64,
        punch: bool,
        whole_only: bool,
        at: At<'_>,
    ) -> Result<()> {
        let c = self.chunk(v, (offset / CHUNK_SIZE) as u32).await?;
        let in_chunk = offset % CHUNK_SIZE;
        let end = in_chunk + len;
        let full_start = in_chunk.div_ceil(BS) * BS;
        let full_end = (end / BS) * BS;
        let zeros = [0u8; BS as usize];
        if !whole_only {
            let mut edges = Vec::new();
            if full_start >= full_end {
                let mut pos = in_chunk;
                while pos < end {
                    let n = (BS - pos % BS).min(end - pos);
                    edges.push((pos, n));
                    pos += n;
                }
            } else {
                if in_chunk < full_start {
                    edges.push((in_chunk, full_start - in_chunk));
                }
                if full_end < end {
                    edges.push((full_end, end - full_end));
                }
            }
            for (pos, n) in edges {
                let z = &zeros[..n as usize];
                self.rmw_block(v, &c, (pos / BS) as u32, (pos % BS) as usize, z, at).await?;
            }
        }
        if full_start < full_end {
            let new = if punch { Entry::Hole } else { Entry::Zero };
            let first = (full_start / BS) as u32;
            let n = ((full_end - full_start) / BS) as u32;
            let current = c.entries(first, n);
            // A discard over a discard changes nothing any epoch reads (a clone's block with
            // no version is not a discard: its parent's shows).
            let same = |e: Entry| {
                (e == new && !(c.has_parent && e == Entry::Hole))
                    || (new == Entry::Hole && e == Entry::Discarded)
            };
            let updates: Vec<(u32, Entry)> = current
                .iter()
                .enumerate()
                .filter(|(_, e)| !same(**e))
                .map(|(i, _)| (first + i as u32, new))
                .collect();
            // One batch per 4096 blocks keeps RocksDB batches (and lock hold times) small.
            for part in updates.chunks(4096) {
                let done = c.commit(&self.meta, part, None, at)?;
                self.note_committed(v, &c, done.data_delta, done.freed);
            }
        }
        Ok(())
    }

    /// Allocation state of `[offset, offset + len)`, merged into extents.
    pub async fn block_status(
        &self,
        v: &Volume,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, Entry)>> {
        self.block_status_at(v, offset, len, 0).await
    }

    /// [`Self::block_status`] at snapshot `epoch` (0: the head). Discarded blocks are
    /// reported as holes.
    pub async fn block_status_at(
        &self,
        v: &Volume,
        offset: u64,
        len: u64,
        epoch: u64,
    ) -> Result<Vec<(u64, Entry)>> {
        let _gate = self.admit(v, offset, len, Admit::Read).await?;
        let mut out: Vec<(u64, Entry)> = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        // A clone's block with no version is its parent's: reported as data (allowed: data
        // may read as zeros).
        let inherits = v.parent().is_some();
        let class = |e: Entry| match e {
            Entry::Data { .. } => Entry::Data { slot: 0, crc: 0 },
            Entry::Hole if inherits => Entry::Data { slot: 0, crc: 0 },
            Entry::Discarded => Entry::Hole,
            other => other,
        };
        while pos < end {
            let chunk_end = (pos / CHUNK_SIZE + 1) * CHUNK_SIZE;
            let seg_end = end.min(chunk_end);
            let c = self.chunk(v, (pos / CHUNK_SIZE) as u32).await?;
            let first = ((pos % CHUNK_SIZE) / BS) as u32;
            let last = (((seg_end - 1) % CHUNK_SIZE) / BS) as u32;
            let entries = self.entries_at(&c, first, last - first + 1, epoch).await?;
            for e in entries {
                let n = (BS - pos % BS).min(seg_end - pos);
                let e = class(e);
                match out.last_mut() {
                    Some((l, le)) if *le == e => *l += n,
                    _ => out.push((n, e)),
                }
                pos += n;
            }
        }
        Ok(out)
    }

    /// The durability barrier (see the module comment): every write completed before this
    /// call is on stable storage when it returns. Also releases the slots freed before it.
    pub async fn barrier(&self) -> Result<()> {
        // Concurrent callers (many Raft groups' log flushes, many frontends' flushes) share
        // barriers: one that *started* after this request covers it.
        let ticket = self.barrier_requests.fetch_add(1, Ordering::SeqCst) + 1;
        let _one = self.barrier_lock.lock().await;
        if self.barrier_covered.load(Ordering::SeqCst) >= ticket {
            return Ok(());
        }
        // Every request taken so far completed its writes before asking: this barrier
        // covers all of them.
        let covers = self.barrier_requests.load(Ordering::SeqCst);
        let chunks: Vec<Arc<Chunk>> = {
            let mut dirty = self.dirty.lock();
            // Clear the flags under the list lock: a write that marks its chunk after this
            // queues it for the next barrier; one that found the flag still set completed its
            // data write before, and our fdatasync below covers it.
            for c in dirty.iter() {
                c.dirty.store(false, Ordering::Release);
            }
            std::mem::take(&mut *dirty)
        };
        let pending: Vec<(Vec<u32>, Vec<u32>)> = chunks.iter().map(|c| c.take_pending()).collect();
        // 1. Data: fdatasync every file written since the last barrier.
        try_join_all(chunks.iter().map(|c| self.engine.sync(c.file.clone())))
            .await
            .map_err(Error::Sync)?;
        // 2. Metadata: only now fsync the WAL, so durable entries never point at unsynced data.
        let meta = self.meta.clone();
        tokio::task::spawn_blocking(move || meta.sync_wal())
            .await
            .map_err(|e| Error::Sync(std::io::Error::other(e)))??;
        // 3. Slots no durable entry references any more become reusable. Those freed by trim
        //    or zeroing are punched first (space back to the filesystem; punching after reuse
        //    would destroy new data); those freed by overwrites are simply reused.
        let mut released = 0u64;
        for (c, (reuse, mut punch)) in chunks.iter().zip(pending) {
            punch.sort_unstable();
            for (slot, _, n) in slot_runs(punch.iter().copied().enumerate()) {
                let r =
                    self.engine.punch_hole(c.file.clone(), slot as u64 * BS, n as u64 * BS).await;
                if let Err(e) = r {
                    tracing::warn!(%e, "punching freed slots failed; space stays allocated");
                }
            }
            c.release(&reuse);
            c.release(&punch);
            released += (reuse.len() + punch.len()) as u64;
        }
        let _ = self.pending_slots.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| {
            Some(p.saturating_sub(released))
        });
        self.barrier_covered.store(covers, Ordering::SeqCst);
        Ok(())
    }
}

/// Byte offset in the volume of `block` of chunk `c`.
fn v_offset(c: &Chunk, block: u32) -> u64 {
    c.index as u64 * CHUNK_SIZE + block as u64 * BS
}

const _: () = assert!(BLOCKS_PER_CHUNK <= u32::MAX as u64);

#[path = "store_epochs.rs"]
mod epochs;
pub use epochs::Usage;
