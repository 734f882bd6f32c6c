//! The snapshot benchmark (run by `bench/snapshots`, release binaries): a managed three-node
//! cluster, a frontend attached through the volume manager, and
//!
//! 1. the time to create `SNAPSHOTS` snapshots of a volume (default 1000), one after the
//!    other, while fio writes to it (each snapshot then holds blocks of its own);
//! 2. 4 KiB random-write IOPS at QD32 on that volume against a twin volume without
//!    snapshots, measured alternately (`ROUNDS` each, the median kept) in the same run;
//! 3. the time to delete them all, and until their space is reclaimed, with fio's write
//!    p99 during the deletions against a run just before;
//! 4. fio's write p99 while a snapshot holding a whole 1 GiB volume alone is reclaimed,
//!    against runs without a reclaim (rounds alternate the order; medians).
//!
//! Prints a Markdown table.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tern_proto::v1::{self, manager_client::ManagerClient, volume_admin_client::VolumeAdminClient};
use tern_tests::cluster::Cluster;
use tern_tests::managers::Managers;
use tern_tests::text;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The deployment's directories, whose daemon logs a failure shows.
static LOG_DIRS: std::sync::OnceLock<Vec<std::path::PathBuf>> = std::sync::OnceLock::new();

/// The warnings and errors in every daemon log of the deployment.
fn daemon_warnings() -> String {
    let mut out = String::new();
    for d in LOG_DIRS.get().into_iter().flatten() {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "log") {
                let t = std::fs::read_to_string(&p).unwrap_or_default();
                out.push_str(&format!("--- {}\n", p.display()));
                for l in t.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")) {
                    if !l.contains("openraft") {
                        out.push_str(l);
                        out.push('\n');
                    }
                }
            }
        }
    }
    out
}

/// Runs fio; returns (write IOPS, write p99 completion latency in microseconds).
fn fio_stats(uri: &str, name: &str, args: &[&str]) -> (f64, f64) {
    let o = Command::new("fio")
        .args([
            &format!("--name={name}"),
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--output-format=json",
        ])
        .args(args)
        .output()
        .expect("fio");
    if !o.status.success() {
        panic!("fio {name} failed\n{}\n{}", text(&o), daemon_warnings());
    }
    // fio may print notes before its JSON.
    let out = String::from_utf8_lossy(&o.stdout);
    let json = &out[out.find('{').unwrap_or(0)..];
    let v: serde_json::Value = serde_json::from_str(json).expect("fio json");
    let w = &v["jobs"][0]["write"];
    let p99 = w["clat_ns"]["percentile"]["99.000000"].as_f64().unwrap_or(0.0) / 1000.0;
    (w["iops"].as_f64().unwrap_or(0.0), p99)
}

fn fio(uri: &str, name: &str, args: &[&str]) -> f64 {
    fio_stats(uri, name, args).0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn volume(name: &str) -> Option<v1::VolumeRef> {
    Some(v1::VolumeRef { r#ref: Some(v1::volume_ref::Ref::Name(name.into())) })
}

fn main() {
    let count = env_u64("SNAPSHOTS", 1000);
    let rounds = env_u64("ROUNDS", 3);
    let runtime = env_u64("RUNTIME", 10);
    let groups = env_u64("CHUNK_GROUPS", 32) as u32;
    let m = Managers::start(&["--node-down-after", "30", "--groups", &groups.to_string()]);
    let mut c = Cluster::start_with(groups, &["--manager", &m.addrs(), "--worker-threads", "1"]);
    m.wait_json(&["node", "list"], Duration::from_secs(60), "three nodes up", |v| {
        v.as_array().is_some_and(|ns| ns.len() == 3 && ns.iter().all(|n| n["state"] == "up"))
    });
    for v in ["snap", "plain"] {
        m.must_tern(&["volume", "create", v, "--size", "1G"]);
    }
    let _ = LOG_DIRS.set(vec![c.dir.path().to_path_buf(), m.dir.path().to_path_buf()]);
    let hv = c.start_another_frontend("hv1", &["--manager", &m.endpoints(), "--host", "hv1"]);
    let uri = |v: &str| format!("nbd://{hv}/{v}");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let endpoint = m.endpoints().split(',').next().unwrap().to_string();
    let mut mgr = rt.block_on(ManagerClient::connect(endpoint.clone())).expect("manager");
    let mut admin = rt.block_on(VolumeAdminClient::connect(endpoint)).expect("manager");

    // 1. Snapshots under writes.
    let mut writer = Command::new("fio")
        .args([
            "--name=bg",
            // One process: killing it stops the writes (fio's job processes outlive a
            // killed parent).
            "--thread",
            "--ioengine=nbd",
            &format!("--uri={}", uri("snap")),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=4",
            "--size=1G",
            "--time_based",
            "--runtime=3600",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("fio");
    std::thread::sleep(Duration::from_secs(2));
    let mut create_ms = Vec::new();
    let t = Instant::now();
    for i in 0..count {
        let req = v1::CreateSnapshotRequest { volume: volume("snap"), name: format!("s{i}") };
        let s = Instant::now();
        rt.block_on(mgr.create_snapshot(req)).expect("create snapshot");
        create_ms.push(s.elapsed().as_secs_f64() * 1000.0);
    }
    let create_total = t.elapsed().as_secs_f64();
    let _ = writer.kill();
    let _ = writer.wait();
    create_ms.sort_by(f64::total_cmp);

    // 2. Write IOPS with and without the snapshots, alternately.
    let args =
        ["--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=1G", "--time_based", "--ramp_time=2"];
    let runtime_arg = format!("--runtime={runtime}");
    let mut with = Vec::new();
    let mut without = Vec::new();
    for r in 0..rounds {
        let mut a: Vec<&str> = args.to_vec();
        a.push(&runtime_arg);
        without.push(fio(&uri("plain"), &format!("plain{r}"), &a));
        with.push(fio(&uri("snap"), &format!("snap{r}"), &a));
    }
    with.sort_by(f64::total_cmp);
    without.sort_by(f64::total_cmp);
    let (w, wo) = (with[with.len() / 2], without[without.len() / 2]);
    let usage = rt
        .block_on(
            mgr.list_snapshots(v1::ListSnapshotsRequest {
                volume: volume("snap"),
                with_usage: true,
            }),
        )
        .expect("usage")
        .into_inner();

    // 3. Delete them all while fio writes (its p99 against a run just before, with the
    //    snapshots still there); then wait for the space to come back.
    let lat_args = ["--rw=randwrite", "--bs=4k", "--iodepth=8", "--size=1G", "--time_based"];
    let mut a: Vec<&str> = lat_args.to_vec();
    a.push(&runtime_arg);
    let quiet = fio_stats(&uri("snap"), "quiet", &a);
    let busy_uri = uri("snap");
    let busy_args: Vec<String> = a.iter().map(|s| s.to_string()).collect();
    let busy = std::thread::spawn(move || {
        let args: Vec<&str> = busy_args.iter().map(String::as_str).collect();
        fio_stats(&busy_uri, "busy", &args)
    });
    let mut delete_ms = Vec::new();
    let t = Instant::now();
    for i in 0..count {
        let req = v1::DeleteSnapshotRequest {
            volume: volume("snap"),
            name: format!("s{i}"),
            wait: false,
        };
        let s = Instant::now();
        rt.block_on(mgr.delete_snapshot(req)).expect("delete snapshot");
        delete_ms.push(s.elapsed().as_secs_f64() * 1000.0);
    }
    let delete_total = t.elapsed().as_secs_f64();
    delete_ms.sort_by(f64::total_cmp);
    // A deletion answers once recorded; the chunk groups drop the snapshots in batches.
    let dropped = loop {
        let left = rt
            .block_on(mgr.list_snapshots(v1::ListSnapshotsRequest {
                volume: volume("snap"),
                with_usage: false,
            }))
            .expect("list")
            .into_inner()
            .snapshots
            .len();
        if left == 0 || t.elapsed() > Duration::from_secs(600) {
            break t.elapsed().as_secs_f64();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let reclaim = Instant::now();
    // The space query scans every version in every group: only once fio is done, so that it
    // does not weigh on the run measured.
    let busy = busy.join().expect("fio during deletions");
    let head = loop {
        let u = rt
            .block_on(mgr.list_snapshots(v1::ListSnapshotsRequest {
                volume: volume("snap"),
                with_usage: true,
            }))
            .expect("usage")
            .into_inner();
        if u.total_bytes == u.head_only_bytes || reclaim.elapsed() > Duration::from_secs(600) {
            break u;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let reclaim_secs = reclaim.elapsed().as_secs_f64();

    // 4. Reclaim under load: in each round a snapshot comes to hold a whole volume alone
    //    (every block written again after it) and is deleted while fio writes to the volume;
    //    fio's p99 then against a run without a reclaim in the same round, before it in even
    //    rounds and after the reclaim in odd ones (this machine's background work, such as
    //    RocksDB compactions after the fills, lands in either). Medians over the rounds.
    m.must_tern(&["volume", "create", "big", "--size", "1G"]);
    let fill = ["--rw=write", "--bs=1M", "--iodepth=8", "--size=1G"];
    let big_usage =
        |mgr: &mut ManagerClient<_>| {
            rt.block_on(mgr.list_snapshots(v1::ListSnapshotsRequest {
                volume: volume("big"),
                with_usage: true,
            }))
            .expect("usage")
            .into_inner()
        };
    let (mut plain_runs, mut reclaim_runs, mut left_after, mut reclaim_secs2) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut held = 0;
    // An even number of rounds: as many plain runs before a reclaim as after one.
    for r in 0..rounds.max(2).div_ceil(2) * 2 {
        fio(&uri("big"), "fill1", &fill);
        let name = format!("old{r}");
        let req = v1::CreateSnapshotRequest { volume: volume("big"), name: name.clone() };
        rt.block_on(mgr.create_snapshot(req)).expect("create snapshot");
        fio(&uri("big"), "fill2", &fill);
        held = big_usage(&mut mgr).total_bytes - big_usage(&mut mgr).head_only_bytes;
        if r % 2 == 0 {
            plain_runs.push(fio_stats(&uri("big"), "plain", &a));
        }
        let (busy_uri, busy_args) =
            (uri("big"), a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let busy = std::thread::spawn(move || {
            let args: Vec<&str> = busy_args.iter().map(String::as_str).collect();
            fio_stats(&busy_uri, "reclaim", &args)
        });
        std::thread::sleep(Duration::from_millis(500));
        let req = v1::DeleteSnapshotRequest { volume: volume("big"), name, wait: false };
        rt.block_on(mgr.delete_snapshot(req)).expect("delete snapshot");
        let t = Instant::now();
        let (mut left, mut done) = (None, None);
        loop {
            assert!(t.elapsed() < Duration::from_secs(900), "reclaim did not finish");
            if !busy.is_finished() {
                // While fio runs, only the cheap count of one replica (the space query scans
                // every version): the volume is written whole, so 1 GiB is its head alone.
                let req = v1::GetVolumeRequest { volume: volume("big") };
                let v = rt.block_on(admin.get_volume(req)).expect("volume").into_inner();
                if done.is_none() && v.allocated_bytes <= 1 << 30 {
                    done = Some(t.elapsed().as_secs_f64());
                }
                std::thread::sleep(Duration::from_millis(250));
                continue;
            }
            let u = big_usage(&mut mgr);
            left.get_or_insert(u.total_bytes - u.head_only_bytes);
            if u.total_bytes == u.head_only_bytes {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        reclaim_secs2.push(done.unwrap_or(t.elapsed().as_secs_f64()));
        reclaim_runs.push(busy.join().expect("fio during the reclaim"));
        left_after.push(left.unwrap_or(0));
        if r % 2 == 1 {
            plain_runs.push(fio_stats(&uri("big"), "plain", &a));
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let p99_plain = median(&mut plain_runs.iter().map(|x| x.1).collect());
    let p99_reclaim = median(&mut reclaim_runs.iter().map(|x| x.1).collect());
    let iops_plain = median(&mut plain_runs.iter().map(|x| x.0).collect());
    let iops_reclaim = median(&mut reclaim_runs.iter().map(|x| x.0).collect());
    let reclaimed_in_run =
        median(&mut left_after.iter().map(|&l| 1.0 - l as f64 / held.max(1) as f64).collect());
    let reclaim_total = median(&mut reclaim_secs2);
    c.must_be_alive();

    let mib = |b: u64| b as f64 / 1048576.0;
    println!("| measure | value |");
    println!("|---|---:|");
    println!(
        "| create {count} snapshots under 4k randwrite QD4: per snapshot p50 / p99 / max | {:.1} / {:.1} / {:.1} ms ({create_total:.1} s in all) |",
        percentile(&create_ms, 0.5),
        percentile(&create_ms, 0.99),
        create_ms.last().unwrap()
    );
    println!(
        "| space held: all versions / snapshots alone / head alone | {:.0} / {:.0} / {:.0} MiB |",
        mib(usage.total_bytes),
        mib(usage.snapshots.iter().map(|s| s.exclusive_bytes).sum()),
        mib(usage.head_only_bytes)
    );
    println!(
        "| 4k randwrite QD32, {count} snapshots vs none (median of {rounds} x {runtime} s) | {w:.0} vs {wo:.0} IOPS = {:.2}x |",
        w / wo
    );
    println!(
        "| delete {count} snapshots: per snapshot p50 / p99 / max | {:.1} / {:.1} / {:.1} ms ({delete_total:.1} s in all; dropped by every chunk group {dropped:.1} s after the first) |",
        percentile(&delete_ms, 0.5),
        percentile(&delete_ms, 0.99),
        delete_ms.last().unwrap()
    );
    println!(
        "| space reclaimed after the deletions (to the head's {:.0} MiB) | {reclaim_secs:.1} s |",
        mib(head.total_bytes)
    );
    println!(
        "| 4k randwrite QD8 during the deletions vs just before ({runtime} s each): p99 / IOPS | {:.0} vs {:.0} us = {:.2}x / {:.0} vs {:.0} |",
        busy.1,
        quiet.1,
        busy.1 / quiet.1,
        busy.0,
        quiet.0
    );
    println!(
        "| 4k randwrite QD8 while a snapshot holding {:.0} MiB alone is reclaimed vs none (median of {} rounds x {runtime} s): p99 / IOPS | {p99_reclaim:.0} vs {p99_plain:.0} us = {:.2}x / {iops_reclaim:.0} vs {iops_plain:.0} |",
        mib(held),
        reclaim_runs.len(),
        p99_reclaim / p99_plain,
    );
    println!(
        "| that reclaim: share done during the {runtime} s run / all done after (medians) | {:.0}% / {reclaim_total:.1} s |",
        reclaimed_in_run * 100.0
    );
}
