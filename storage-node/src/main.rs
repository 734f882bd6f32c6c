//! `tern-storage-node`: parse config, open the chunk store, serve gRPC.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use tern_common::runtime::{self, RuntimeOptions};
use tern_storage_node::engine::EngineKind;
use tern_storage_node::replication::{Cluster, ClusterConfig};
use tern_storage_node::store::{ChunkStore, StoreConfig};

/// mimalloc: small allocations (request buffers, log entries, messages) on every I/O; glibc's
/// malloc cost about a tenth of a node's CPU under 4 KiB random writes.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Engine {
    /// io_uring on a dedicated thread (falls back to sync where io_uring is unavailable).
    Uring,
    /// Positional syscalls on a thread pool.
    Sync,
}

/// Tern storage node: holds volume chunks and serves them over gRPC.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Address for the gRPC services.
    #[arg(long, default_value = "127.0.0.1:7700", env = "TERN_LISTEN")]
    listen: SocketAddr,
    /// Directory for RocksDB and the data files.
    #[arg(long, env = "TERN_DATA_DIR")]
    data_dir: PathBuf,
    #[arg(long, value_enum, default_value = "uring")]
    io_engine: Engine,
    /// Use O_DIRECT for data files where the filesystem supports it.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    direct_io: bool,
    #[arg(long, default_value_t = 1)]
    node_id: u64,
    /// Tokio worker threads (default: one per core).
    #[arg(long, env = "TERN_WORKER_THREADS")]
    worker_threads: Option<usize>,
    /// Poll briefly for new work before a worker thread sleeps: lower latency at low queue
    /// depth (no wake-up through the hypervisor), paid in otherwise idle CPU time. The window
    /// adapts and falls to zero when idle (see `tern_common::runtime`).
    #[arg(long, env = "TERN_POLL", default_value_t = true, action = clap::ArgAction::Set)]
    poll: bool,
    /// The most CPU polling may take, in percent of one CPU over time (1-100).
    #[arg(long, env = "TERN_POLL_BUDGET", default_value_t = 100,
          value_parser = clap::value_parser!(u8).range(1..=100))]
    poll_budget: u8,
    /// Datacenter label of this node.
    #[arg(long, default_value = "dc1")]
    datacenter: String,
    /// Run as a member of a replicated cluster: every member as ID=HOST:PORT@DATACENTER,
    /// comma-separated, one per datacenter (this node included, under --node-id). Without
    /// it the node serves `local` volumes alone.
    #[arg(long, env = "TERN_CLUSTER")]
    cluster: Option<String>,
    /// Data chunk groups (Raft groups) of the cluster; fixed when the cluster is created.
    #[arg(long, default_value_t = 32)]
    groups: u32,
    /// Accept the test-only fault switch (RaftTransport.SetFaults).
    #[arg(long)]
    fault_injection: bool,
    /// TESTS ONLY, LOSES DATA: acknowledge writes from the group leader's own store without
    /// replicating them (shows that the fault suite catches lost writes).
    #[arg(long, hide = true)]
    unsafe_no_replication: bool,
    /// Raft log entries between snapshots of a chunk group: the log kept per group is about
    /// this long; a replica further behind gets the group's data streamed instead.
    #[arg(long, default_value_t = 1024)]
    snapshot_every: u64,
    /// A new node not in --cluster, started to replace one (`tern node replace`): its groups
    /// start empty and fill as the replacement adds it.
    #[arg(long)]
    join: bool,
    /// Background scrub of replicated volumes, in MiB/s at most (0 = off): every block is
    /// read and checked, damaged ones are repaired from another replica.
    #[arg(long, default_value_t = 16)]
    scrub_rate_mib: u64,
    /// Seconds between scrub passes.
    #[arg(long, default_value_t = 3600)]
    scrub_pause_secs: u64,
    /// Volume manager replicas (HOST:PORT, comma-separated): the node registers with them
    /// and sends heartbeats.
    #[arg(long, value_delimiter = ',', env = "TERN_MANAGER")]
    manager: Vec<String>,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics (none without it).
    #[arg(long, value_name = "HOST:PORT")]
    metrics_listen: Option<SocketAddr>,
    /// Refuse client writes once the data directory's filesystem is used beyond this share
    /// of its size (0 < ratio <= 1): a disk that fills up would stop chunk groups.
    #[arg(long, default_value_t = 0.95)]
    full_ratio: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tern_common::init_logging();
    let opts = RuntimeOptions {
        worker_threads: args.worker_threads,
        poll: args.poll,
        poll_budget: f64::from(args.poll_budget) / 100.0,
    };
    let rt = runtime::build(opts)?;
    rt.block_on(async move {
        let store = ChunkStore::open(StoreConfig {
            data_dir: args.data_dir.clone(),
            engine: match args.io_engine {
                Engine::Uring => EngineKind::Uring,
                Engine::Sync => EngineKind::Sync,
            },
            direct_io: args.direct_io,
        })?;
        store.fullness.set_ratio(args.full_ratio).map_err(anyhow::Error::msg)?;
        tokio::spawn(tern_storage_node::fullness::watch(store.clone(), args.data_dir.clone()));
        let link =
            (!args.manager.is_empty()).then(|| tern_storage_node::manager_link::ManagerLink {
                managers: args.manager.clone(),
                node_id: args.node_id,
                address: args.listen.to_string(),
                datacenter: args.datacenter.clone(),
                data_dir: args.data_dir.clone(),
                store: store.clone(),
            });
        // The members: from --cluster, or else from the volume manager (which forms the
        // cluster once nodes of three datacenters have registered).
        let members = match (&args.cluster, &link) {
            (Some(list), _) => Some((
                ClusterConfig::parse_nodes(list).map_err(anyhow::Error::msg)?,
                args.groups,
                args.join,
                Vec::new(),
            )),
            (None, Some(link)) => {
                let c = link.cluster_config().await.map_err(anyhow::Error::msg)?;
                let (groups, join) = (c.groups, c.join);
                let nodes = c
                    .members
                    .into_iter()
                    .map(|n| tern_common::NodeAddr {
                        id: n.id,
                        address: n.address,
                        datacenter: n.datacenter,
                    })
                    .collect::<Vec<_>>();
                tracing::info!(
                    members = nodes.len(),
                    groups,
                    join,
                    "storage cluster configuration from the volume manager"
                );
                Some((nodes, groups, join, c.placement))
            }
            (None, None) => None,
        };
        let cluster = match members {
            None => None,
            Some((nodes, groups, join, placement)) => {
                if let Some(me) = nodes.iter().find(|n| n.id == args.node_id) {
                    if me.datacenter != args.datacenter {
                        anyhow::bail!(
                            "--datacenter {} disagrees with the cluster list ({})",
                            args.datacenter,
                            me.datacenter
                        );
                    }
                }
                let cfg = ClusterConfig {
                    node_id: args.node_id,
                    nodes,
                    groups,
                    fault_injection: args.fault_injection,
                    unsafe_no_replication: args.unsafe_no_replication,
                    snapshot_every: args.snapshot_every,
                    join,
                    scrub_rate: args.scrub_rate_mib << 20,
                    scrub_pause: std::time::Duration::from_secs(args.scrub_pause_secs),
                    placement,
                };
                if cfg.unsafe_no_replication {
                    tracing::warn!(
                        "--unsafe-no-replication: acknowledged writes are NOT replicated"
                    );
                }
                Some(Cluster::start(cfg, store.clone(), store.meta()).await?)
            }
        };
        if let Some(link) = link {
            // Asking for the cluster configuration registered the node already.
            let registered = args.cluster.is_none();
            tokio::spawn(link.run(registered));
        }
        let shutdown = tern_common::daemon::shutdown_signal();
        tern_storage_node::serve(
            store,
            args.listen,
            args.node_id,
            args.datacenter,
            cluster,
            args.metrics_listen,
            shutdown,
        )
        .await?;
        anyhow::Ok(())
    })
}
