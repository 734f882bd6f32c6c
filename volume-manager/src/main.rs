//! `tern-volume-manager`: one replica of Tern's control plane.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tern_common::NodeAddr;
use tern_proto::v1::{
    manager_raft_server::ManagerRaftServer, manager_server::ManagerServer,
    volume_admin_server::VolumeAdminServer,
};
use tern_volume_manager::{monitor, raft::network::RaftService, service::Service};

#[derive(Parser, Debug)]
#[command(name = "tern-volume-manager", version, about = "Tern's replicated volume manager")]
struct Args {
    /// This replica's id (one of --peers).
    #[arg(long)]
    node_id: u64,
    /// The manager replicas, ID=HOST:PORT@DATACENTER, comma-separated (one per datacenter).
    #[arg(long, value_delimiter = ',', required = true)]
    peers: Vec<NodeAddr>,
    /// Where to listen (defaults to this replica's address in --peers).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Directory of the replica's Raft log and snapshots.
    #[arg(long)]
    data_dir: PathBuf,
    /// A storage node silent this long (seconds) is marked down.
    #[arg(long, default_value_t = 10)]
    node_down_after: u64,
    /// A storage cluster member down this long (seconds) has its replicas moved to a spare
    /// node of its datacenter (0: never; draining a node moves them at once).
    #[arg(long, default_value_t = 60)]
    replace_down_after: u64,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics (none without it).
    #[arg(long, value_name = "HOST:PORT")]
    metrics_listen: Option<SocketAddr>,
    /// Chunk groups (Raft groups) of the storage cluster the manager forms; fixed once formed.
    #[arg(long, default_value_t = 32)]
    groups: u32,
}

fn main() -> anyhow::Result<()> {
    tern_common::init_logging();
    let args = Args::parse();
    let me = args
        .peers
        .iter()
        .find(|p| p.id == args.node_id)
        .ok_or_else(|| anyhow::anyhow!("--node-id {} is not one of --peers", args.node_id))?
        .clone();
    let mut ids: Vec<u64> = args.peers.iter().map(|p| p.id).collect();
    ids.sort_unstable();
    ids.dedup();
    if ids.len() != args.peers.len() {
        anyhow::bail!("--peers lists an id twice");
    }
    if args.groups == 0 {
        anyhow::bail!("--groups must be at least 1");
    }
    let listen: SocketAddr = match args.listen {
        Some(a) => a,
        None => me
            .address
            .parse()
            .map_err(|e| anyhow::anyhow!("--peers address {:?}: {e}", me.address))?,
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| anyhow::anyhow!("listening on {listen}: {e}"))?;
        let m = tern_volume_manager::start(args.node_id, &args.peers, &args.data_dir, args.groups).await?;
        tokio::spawn(monitor::watch_nodes(m.clone(), Duration::from_secs(args.node_down_after)));
        tokio::spawn(monitor::finish_snapshots(m.clone()));
        tokio::spawn(monitor::delete_snapshots(m.clone()));
        tokio::spawn(monitor::keep_cluster_whole(
            m.clone(),
            Duration::from_secs(args.replace_down_after),
        ));
        if let Some(addr) = args.metrics_listen {
            let registry = tern_volume_manager::metrics::registry(m.clone())?;
            tern_common::metrics::spawn(addr, registry)
                .await
                .map_err(|e| anyhow::anyhow!("metrics on {addr}: {e}"))?;
        }
        tracing::info!(id = args.node_id, %listen, datacenter = %me.datacenter, "volume manager listening");
        let svc = Service(m.clone());
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let shutdown = tern_common::daemon::shutdown_signal();
        let server = tonic::transport::Server::builder()
            .add_service(ManagerRaftServer::new(RaftService { raft: m.raft.clone() }))
            .add_service(ManagerServer::new(svc.clone()))
            .add_service(VolumeAdminServer::new(svc))
            .serve_with_incoming(incoming);
        // Every acknowledged change is already synced in the log: stopping at once loses
        // nothing (clients with open connections would hold a graceful shutdown forever).
        tokio::select! {
            r = server => r?,
            () = shutdown => {}
        }
        let _ = m.raft.shutdown().await;
        Ok(())
    })
}
