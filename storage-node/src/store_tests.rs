//! Chunk-store behaviour, run against both I/O engines (one suite, every implementation).

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use bytes::Bytes;

use crate::engine::EngineKind;
use crate::error::Error;
use crate::meta::Entry;
use crate::store::{ChunkStore, NewVolume, StoreConfig, Volume};

const MIB: u64 = 1 << 20;

fn open(dir: &std::path::Path, engine: EngineKind) -> Arc<ChunkStore> {
    ChunkStore::open(StoreConfig { data_dir: dir.to_path_buf(), engine, direct_io: true }).unwrap()
}

async fn vol(s: &ChunkStore, name: &str, size: u64) -> Arc<Volume> {
    s.create_volume(NewVolume { name: name.into(), size, ..Default::default() }).await.unwrap()
}

fn pattern(len: usize, seed: u8) -> Bytes {
    Bytes::from(
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1).collect::<Vec<u8>>(),
    )
}

async fn suite(engine: EngineKind) {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), engine);
    let v = vol(&s, "a", 256 * MIB).await;

    // Unwritten reads as zeros.
    assert!(s.read(&v, 0, 8192).await.unwrap().iter().all(|&b| b == 0));

    // Aligned, unaligned, cross-chunk writes read back.
    let p = pattern(64 * 1024, 1);
    s.write(&v, 4096, p.clone(), false).await.unwrap();
    assert_eq!(s.read(&v, 4096, p.len() as u64).await.unwrap(), p);
    let q = pattern(10_000, 2);
    s.write(&v, 4096 + 777, q.clone(), false).await.unwrap();
    assert_eq!(s.read(&v, 4096 + 777, q.len() as u64).await.unwrap(), q);
    assert_eq!(s.read(&v, 4096, 777).await.unwrap(), p.slice(..777));
    let cross = pattern(3 * 4096 + 100, 3);
    let at = 64 * MIB - 4096 - 50;
    s.write(&v, at, cross.clone(), true).await.unwrap();
    assert_eq!(s.read(&v, at, cross.len() as u64).await.unwrap(), cross);

    // Concurrent sub-block writes to different sectors of one block all land.
    let mut hs = Vec::new();
    for i in 0..8u64 {
        let (s, v) = (s.clone(), v.clone());
        hs.push(tokio::spawn(async move {
            s.write(&v, MIB + i * 512, Bytes::from(vec![i as u8 + 1; 512]), false).await.unwrap();
        }));
    }
    for h in hs {
        h.await.unwrap();
    }
    let blk = s.read(&v, MIB, 4096).await.unwrap();
    for i in 0..8 {
        assert!(blk[i * 512..(i + 1) * 512].iter().all(|&b| b == i as u8 + 1), "sector {i}");
    }

    // Zeroes and trim.
    s.write(&v, 2 * MIB, pattern(MIB as usize, 4), false).await.unwrap();
    s.write_zeroes(&v, 2 * MIB + 100, 8192, false, false).await.unwrap();
    let r = s.read(&v, 2 * MIB, 3 * 4096).await.unwrap();
    assert!(r[100..100 + 8192].iter().all(|&b| b == 0));
    assert_ne!(r[99], 0);
    s.trim(&v, 2 * MIB, MIB, false).await.unwrap();
    assert!(s.read(&v, 2 * MIB, MIB).await.unwrap().iter().all(|&b| b == 0));
    let st = s.block_status(&v, 2 * MIB, MIB).await.unwrap();
    assert_eq!(st, vec![(MIB, Entry::Hole)]);
    s.write_zeroes(&v, 2 * MIB, 4096, false, false).await.unwrap();
    let st = s.block_status(&v, 2 * MIB, 8192).await.unwrap();
    assert_eq!(st, vec![(4096, Entry::Zero), (4096, Entry::Hole)]);

    // Errors.
    assert!(matches!(s.read(&v, 256 * MIB - 10, 20).await, Err(Error::OutOfRange { .. })));
    assert!(matches!(s.read(&v, u64::MAX, 2).await, Err(Error::OutOfRange { .. })));
    assert!(matches!(
        s.create_volume(NewVolume { name: "a".into(), size: MIB, ..Default::default() }).await,
        Err(Error::VolumeExists(_))
    ));
    assert!(matches!(
        s.create_volume(NewVolume { name: "b/c".into(), size: MIB, ..Default::default() }).await,
        Err(Error::Input(_))
    ));
    s.set_read_only(&v, true).await.unwrap();
    assert!(matches!(s.write(&v, 0, pattern(4096, 0), false).await, Err(Error::ReadOnly { .. })));
    s.set_read_only(&v, false).await.unwrap();

    // Resize: shrink refused unless allowed, and discards the tail.
    s.write(&v, 100 * MIB, pattern(4096, 9), true).await.unwrap();
    assert!(matches!(s.resize_volume(&v, 64 * MIB, false).await, Err(Error::ShrinkRefused { .. })));
    s.resize_volume(&v, 64 * MIB, true).await.unwrap();
    assert!(matches!(s.read(&v, 100 * MIB, 4096).await, Err(Error::OutOfRange { .. })));
    s.resize_volume(&v, 256 * MIB, false).await.unwrap();
    assert!(s.read(&v, 100 * MIB, 4096).await.unwrap().iter().all(|&b| b == 0));

    // Durable across a reopen.
    s.barrier().await.unwrap();
    let expect = s.read(&v, 0, 4 * MIB).await.unwrap();
    let allocated = v.allocated_bytes();
    assert!(allocated > 0);
    drop(v);
    drop(s);
    let s = open(dir.path(), engine);
    let v = s.get_by_name("a").unwrap();
    assert_eq!(s.read(&v, 0, 4 * MIB).await.unwrap(), expect);
    assert_eq!(v.allocated_bytes(), allocated);

    // Delete.
    s.delete_volume(&v).await.unwrap();
    assert!(matches!(s.get_by_name("a"), Err(Error::VolumeNotFound(_))));
    assert!(matches!(s.read(&v, 0, 4096).await, Err(Error::VolumeDeleted(_))));
    let v2 = vol(&s, "a", MIB).await;
    assert!(s.read(&v2, 0, MIB).await.unwrap().iter().all(|&b| b == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_suite_uring() {
    suite(EngineKind::Uring).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_suite_sync() {
    suite(EngineKind::Sync).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corruption_is_an_error_never_wrong_data() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), EngineKind::Uring);
    let v = vol(&s, "c", 64 * MIB).await;
    s.write(&v, 0, pattern(8192, 5), true).await.unwrap();
    // Flip one byte in the slot holding block 0 (the first slot of a fresh file).
    let slot = 0usize;
    let path = dir.path().join("volumes").join(v.id.0.to_string()).join("0.dat");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[slot * 4096 + 10] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    // The store must notice on read (the page cache is bypassed by O_DIRECT reads).
    let err = s.read(&v, 0, 4096).await.unwrap_err();
    assert!(matches!(err, Error::ChecksumMismatch { .. }), "{err}");
    assert_eq!(s.checksum_errors(), 1);
    // The other block is fine.
    assert_eq!(s.read(&v, 4096, 4096).await.unwrap(), pattern(8192, 5).slice(4096..));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimmed_space_is_released() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), EngineKind::Uring);
    let v = vol(&s, "t", 64 * MIB).await;
    s.write(&v, 0, pattern(8 * MIB as usize, 6), true).await.unwrap();
    let path = dir.path().join("volumes").join(v.id.0.to_string()).join("0.dat");
    let used = std::fs::metadata(&path).unwrap().blocks() * 512;
    assert!(used >= 8 * MIB, "{used}");
    assert_eq!(v.allocated_bytes(), 8 * MIB);
    s.trim(&v, 0, 8 * MIB, false).await.unwrap();
    s.barrier().await.unwrap();
    let after = std::fs::metadata(&path).unwrap().blocks() * 512;
    assert!(after < MIB, "trim must release space: {after} bytes still allocated");
    assert_eq!(v.allocated_bytes(), 0);
    // Overwrites without flushes do not grow the file without bound: slots are reused after
    // each barrier.
    for _ in 0..4 {
        s.write(&v, 0, pattern(4 * MIB as usize, 7), false).await.unwrap();
        s.barrier().await.unwrap();
    }
    let size = std::fs::metadata(&path).unwrap().len();
    assert!(size <= 16 * MIB, "file grew to {size}");
}

/// Versions and snapshots in the chunk store: what each epoch reads, what a reclaim frees,
/// the changes between epochs, and all of it across a restart.
#[tokio::test]
async fn epochs_keep_what_snapshots_see() {
    use crate::chunk::At;
    use crate::epoch::Epochs;
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), EngineKind::Sync);
    let v = vol(&s, "e", 128 * MIB).await;
    let mut ep = Epochs::default();
    let b = 4096u64;
    // Epoch 1: blocks 0..4 hold A; block 4 holds zeros; chunk 1 block 0 holds A.
    let a = pattern(4 * b as usize, 1);
    s.apply_write(&v, 0, a.clone(), At::Epoch { epoch: 1, epochs: &ep }).await.unwrap();
    s.apply_write(&v, 64 * MIB, a.slice(..4096), At::Epoch { epoch: 1, epochs: &ep })
        .await
        .unwrap();
    s.apply_write_zeroes(&v, 4 * b, b, false, At::Epoch { epoch: 1, epochs: &ep }).await.unwrap();
    // Overwrites within one epoch replace: still 5 data blocks.
    s.apply_write(&v, 0, a.slice(..4096), At::Epoch { epoch: 1, epochs: &ep }).await.unwrap();
    assert_eq!(v.allocated_bytes(), 5 * b);
    ep.snapshot(1);
    // Epoch 2: block 0 rewritten, block 1 trimmed, block 2 zeroed; block 3 untouched.
    let bb = pattern(b as usize, 2);
    s.apply_write(&v, 0, bb.clone(), At::Epoch { epoch: 2, epochs: &ep }).await.unwrap();
    s.apply_trim(&v, b, b, At::Epoch { epoch: 2, epochs: &ep }).await.unwrap();
    s.apply_write_zeroes(&v, 2 * b, b, false, At::Epoch { epoch: 2, epochs: &ep }).await.unwrap();
    // A second write at epoch 2 replaces the first (snapshot 1 keeps its own).
    let cc = pattern(b as usize, 3);
    s.apply_write(&v, 0, cc.clone(), At::Epoch { epoch: 2, epochs: &ep }).await.unwrap();
    assert_eq!(v.allocated_bytes(), 6 * b, "5 kept for snapshot 1, 1 new");

    let check = |s: Arc<ChunkStore>, v: Arc<Volume>, a: Bytes, cc: Bytes| async move {
        let head = s.read_at(&v, 0, 5 * b, 0).await.unwrap();
        assert_eq!(&head[..4096], &cc[..]);
        assert!(head[4096..3 * 4096].iter().all(|&x| x == 0));
        assert_eq!(&head[3 * 4096..4 * 4096], &a[3 * 4096..]);
        let snap = s.read_at(&v, 0, 4 * b, 1).await.unwrap();
        assert_eq!(&snap[..4096], &a[..4096]);
        assert_eq!(&snap[4096..], &a[4096..]);
        // Block status: the trimmed block is a hole at the head, data in the snapshot.
        let st = s.block_status_at(&v, b, b, 0).await.unwrap();
        assert_eq!(st, vec![(b, Entry::Hole)]);
        let st = s.block_status_at(&v, b, b, 1).await.unwrap();
        assert!(matches!(st[0].1, Entry::Data { .. }));
    };
    check(s.clone(), v.clone(), a.clone(), cc.clone()).await;

    // Changes: from nothing to snapshot 1, and from snapshot 1 to the head.
    let all = s.changes(&v, &[0, 1], 0, 1).await.unwrap();
    assert_eq!(all, vec![(0, 4 * b, false), (4 * b, b, true), (64 * MIB, b, false)]);
    let since = s.changes(&v, &[0, 1], 1, 0).await.unwrap();
    assert_eq!(since, vec![(0, b, false), (b, 2 * b, true)]);

    // Usage: blocks 0-2's old versions are snapshot 1's alone; block 0's new one the head's.
    let u = s.usage(&v, &[0, 1], &ep).await.unwrap();
    assert_eq!(u.total, 6);
    assert_eq!(u.head_only, 1);
    assert_eq!(u.exclusive.get(&1), Some(&3), "the old blocks 0, 1 and 2");

    // A restart keeps every version.
    drop((s, v));
    let s = open(dir.path(), EngineKind::Sync);
    let v = s.get_by_name("e").unwrap();
    check(s.clone(), v.clone(), a.clone(), cc.clone()).await;
    assert_eq!(v.allocated_bytes(), 6 * b);

    // Deleting the snapshot and reclaiming frees what only it held.
    ep.delete(1);
    let freed = s.collect(&v, &[0, 1], &ep).await.unwrap();
    assert_eq!(freed, 3);
    assert_eq!(v.allocated_bytes(), 3 * b);
    let head = s.read_at(&v, 0, 4 * b, 0).await.unwrap();
    assert_eq!(&head[..4096], &cc[..]);
    assert!(head[4096..3 * 4096].iter().all(|&x| x == 0));
    assert_eq!(s.block_status_at(&v, b, b, 0).await.unwrap(), vec![(b, Entry::Hole)]);
    let versions = s.chunk_versions(&v, 0).await.unwrap();
    assert_eq!(versions.len(), 4, "blocks 0, 2, 3, 4; no discard left: {versions:?}");
    assert_eq!(
        s.changes(&v, &[0, 1], 0, 0).await.unwrap(),
        vec![
            (0, b, false),
            (2 * b, b, true),
            (3 * b, b, false),
            (4 * b, b, true),
            (64 * MIB, b, false)
        ]
    );

    // Wiping a chunk removes every version.
    s.wipe_chunk(&v, 0).await.unwrap();
    assert!(s.chunk_versions(&v, 0).await.unwrap().is_empty());
    assert!(s.read(&v, 0, 5 * b).await.unwrap().iter().all(|&x| x == 0));
}

/// A write that learned of a snapshot this replica has not applied yet keeps the version
/// below it: the snapshot, once applied, sees it.
#[tokio::test]
async fn write_ahead_of_a_snapshot_keeps_the_version() {
    use crate::chunk::At;
    use crate::epoch::Epochs;
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), EngineKind::Sync);
    let v = vol(&s, "w", 64 * MIB).await;
    let mut ep = Epochs::default();
    let a = pattern(4096, 7);
    s.apply_write(&v, 0, a.clone(), At::Epoch { epoch: 1, epochs: &ep }).await.unwrap();
    s.apply_write(&v, 0, pattern(4096, 8), At::Epoch { epoch: 2, epochs: &ep }).await.unwrap();
    ep.snapshot(1);
    assert_eq!(s.read_at(&v, 0, 4096, 1).await.unwrap(), a);
    // A version below the newest at a higher epoch than the write is refused.
    let r = s.apply_write(&v, 0, a.clone(), At::Epoch { epoch: 1, epochs: &ep }).await;
    assert!(matches!(r, Err(Error::Internal(_))), "{r:?}");
}

/// A rollback makes the head read as the snapshot, keeps what later snapshots see, and is
/// the same when applied twice.
#[tokio::test]
async fn rollback_restores_the_snapshot_and_keeps_later_ones() {
    use crate::chunk::At;
    use crate::epoch::Epochs;
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), EngineKind::Sync);
    let v = vol(&s, "r", 64 * MIB).await;
    let b = 4096u64;
    let mut ep = Epochs::default();
    let a = pattern(3 * b as usize, 1);
    s.apply_write(&v, 0, a.clone(), At::Epoch { epoch: 1, epochs: &ep }).await.unwrap();
    ep.snapshot(1);
    // Epoch 2: block 0 rewritten, block 1 trimmed, block 3 written (a hole in snapshot 1).
    let b2 = pattern(b as usize, 2);
    s.apply_write(&v, 0, b2.clone(), At::Epoch { epoch: 2, epochs: &ep }).await.unwrap();
    s.apply_trim(&v, b, b, At::Epoch { epoch: 2, epochs: &ep }).await.unwrap();
    s.apply_write(&v, 3 * b, b2.clone(), At::Epoch { epoch: 2, epochs: &ep }).await.unwrap();
    ep.snapshot(2);
    // Epoch 3: block 2 rewritten (only the head has it).
    s.apply_write(&v, 2 * b, pattern(b as usize, 3), At::Epoch { epoch: 3, epochs: &ep })
        .await
        .unwrap();
    for _ in 0..2 {
        s.rollback(&v, &[0], 1, ep.floor, &ep).await.unwrap();
        let head = s.read_at(&v, 0, 4 * b, 0).await.unwrap();
        assert_eq!(&head[..3 * b as usize], &a[..], "the head reads as snapshot 1");
        assert!(head[3 * b as usize..].iter().all(|&x| x == 0));
        // Snapshot 2 is untouched.
        let two = s.read_at(&v, 0, 4 * b, 2).await.unwrap();
        assert_eq!(&two[..4096], &b2[..]);
        assert!(two[4096..8192].iter().all(|&x| x == 0));
        assert_eq!(&two[8192..3 * 4096], &a[8192..]);
        assert_eq!(&two[3 * 4096..], &b2[..]);
    }
    // Block 2's epoch-3 version (nobody else's) is gone; writes go on at the floor.
    s.apply_write(&v, 0, pattern(b as usize, 4), At::Epoch { epoch: 3, epochs: &ep })
        .await
        .unwrap();
    assert_eq!(s.read_at(&v, 0, b, 1).await.unwrap(), a.slice(..4096));
    // Without later snapshots, a rollback copies nothing: the newer versions just go.
    let mut solo = Epochs::default();
    let w = vol(&s, "solo", 64 * MIB).await;
    s.apply_write(&w, 0, a.clone(), At::Epoch { epoch: 1, epochs: &solo }).await.unwrap();
    solo.snapshot(1);
    s.apply_write(&w, 0, b2.clone(), At::Epoch { epoch: 2, epochs: &solo }).await.unwrap();
    assert_eq!(w.allocated_bytes(), 4 * b);
    s.rollback(&w, &[0], 1, solo.floor, &solo).await.unwrap();
    assert_eq!(w.allocated_bytes(), 3 * b);
    assert_eq!(s.read(&w, 0, 3 * b).await.unwrap(), a);
}

/// A clone reads its parent's snapshot where it wrote nothing, and the two stay apart both
/// ways; copying up makes it independent.
#[tokio::test]
async fn clones_inherit_and_stay_isolated() {
    use crate::chunk::At;
    use crate::epoch::Epochs;
    use crate::meta::Parent;
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), EngineKind::Sync);
    let p = vol(&s, "p", 128 * MIB).await;
    let b = 4096u64;
    let mut pe = Epochs::default();
    let a = pattern(8 * b as usize, 1);
    s.apply_write(&p, 0, a.clone(), At::Epoch { epoch: 1, epochs: &pe }).await.unwrap();
    s.apply_write(&p, 64 * MIB, a.clone(), At::Epoch { epoch: 1, epochs: &pe }).await.unwrap();
    pe.snapshot(1);
    let new = NewVolume {
        name: "c".into(),
        size: 128 * MIB,
        parent: Some(Parent { volume: p.id.0, epoch: 1 }),
        placement: p.id.0,
        ..Default::default()
    };
    let c = s.create_volume(new).await.unwrap();
    let ce = Epochs::default();
    let at = At::Epoch { epoch: 1, epochs: &ce };
    assert_eq!(s.read(&c, 0, 8 * b).await.unwrap(), a, "inherited");
    // The parent moves on: the clone keeps the snapshot's content.
    s.apply_write(&p, 0, pattern(b as usize, 9), At::Epoch { epoch: 2, epochs: &pe })
        .await
        .unwrap();
    assert_eq!(s.read(&c, 0, b).await.unwrap(), a.slice(..4096));
    // The clone writes part of a block, trims another: the parent's snapshot is untouched.
    s.apply_write(&c, b + 100, Bytes::from_static(b"clone"), at).await.unwrap();
    s.apply_trim(&c, 2 * b, b, at).await.unwrap();
    let got = s.read(&c, b, 2 * b).await.unwrap();
    let mut want = a.slice(4096..8192).to_vec();
    want[100..105].copy_from_slice(b"clone");
    assert_eq!(&got[..4096], &want[..]);
    assert!(got[4096..].iter().all(|&x| x == 0), "a trimmed inherited block reads zeros");
    assert_eq!(s.read_at(&p, 0, 8 * b, 1).await.unwrap(), a);
    // Copying up: every inherited block now is the clone's own; without its parent it reads
    // the same.
    s.copy_up(&c, &[0, 1], &ce).await.unwrap();
    s.clear_parent(&c).await.unwrap();
    let all = s.read(&c, 0, 8 * b).await.unwrap();
    assert_eq!(&all[..4096], &a[..4096]);
    assert_eq!(&all[4096..8192], &want[..]);
    assert!(all[8192..3 * 4096].iter().all(|&x| x == 0));
    assert_eq!(&all[3 * 4096..], &a[3 * 4096..]);
    assert_eq!(s.read(&c, 64 * MIB, 8 * b).await.unwrap(), a);
}

/// A leader's prewrite: the apply of the same bytes takes its slots (no second data write);
/// other bytes never do; unused slots are given back and reused; nothing is readable before
/// the apply, nor after a crash that came first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prewritten_data_is_applied_once_and_given_back_when_unused() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), EngineKind::Uring);
    let v = vol(&s, "p", 128 * MIB).await;
    let path = dir.path().join("volumes").join(v.id.0.to_string()).join("0.dat");
    let head = crate::store::head_at;

    // Only whole blocks within one chunk.
    assert!(s.prewrite(&v, 100, &pattern(4096, 1)).await.is_none());
    assert!(s.prewrite(&v, 0, &pattern(1000, 1)).await.is_none());
    assert!(s.prewrite(&v, 64 * MIB - 4096, &pattern(8192, 1)).await.is_none());
    assert!(s.prewrite(&v, 0, &Bytes::from(vec![0u8; 8192])).await.is_none(), "zeroes: no data");

    // The apply of the same bytes takes the prewrite; nothing reads it before.
    let p = pattern(8192, 7);
    let pre = s.prewrite(&v, 4096, &p).await.expect("an aligned write is prewritten");
    assert!(s.read(&v, 4096, 8192).await.unwrap().iter().all(|&b| b == 0));
    s.apply_write(&v, 4096, p.clone(), head()).await.unwrap();
    s.release_prewritten(pre);
    assert_eq!(s.prewrites(), (1, 0));
    assert_eq!(s.read(&v, 4096, 8192).await.unwrap(), p);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 2 * 4096, "one data write, two slots");

    // An apply that comes while the prewrite's write is under way waits for it.
    let p2 = pattern(8192, 8);
    let (pre, ()) = tokio::join!(s.prewrite(&v, 8 * 4096, &p2), async {
        s.apply_write(&v, 8 * 4096, p2.clone(), head()).await.unwrap()
    });
    s.release_prewritten(pre.unwrap());
    assert_eq!(s.prewrites(), (2, 0));
    assert_eq!(s.read(&v, 8 * 4096, 8192).await.unwrap(), p2);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 4 * 4096);

    // Other bytes at the same place are not taken; the unused slots are given back and the
    // next write reuses them (the file does not grow).
    let pre = s.prewrite(&v, 4096, &pattern(8192, 9)).await.unwrap();
    let q = pattern(8192, 11);
    s.apply_write(&v, 4096, q.clone(), head()).await.unwrap();
    s.release_prewritten(pre);
    assert_eq!(s.prewrites(), (2, 1));
    assert_eq!(s.read(&v, 4096, 8192).await.unwrap(), q);
    let size = std::fs::metadata(&path).unwrap().len();
    s.write(&v, 20 * 4096, pattern(8192, 12), false).await.unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), size, "given-back slots are reused");

    // A crash between the prewrite and the apply: the data is not there, its slots are free.
    let _lost = s.prewrite(&v, 40 * 4096, &pattern(8192, 13)).await.unwrap();
    let size = std::fs::metadata(&path).unwrap().len();
    drop(v);
    drop(s);
    let s = open(dir.path(), EngineKind::Uring);
    let v = s.get_by_name("p").unwrap();
    assert!(s.read(&v, 40 * 4096, 8192).await.unwrap().iter().all(|&b| b == 0));
    assert_eq!(s.read(&v, 4096, 8192).await.unwrap(), q);
    s.write(&v, 60 * 4096, pattern(8192, 14), false).await.unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), size, "the lost prewrite's slots are free");
}
