//! `tern-nbd-frontend`: serves Tern volumes over NBD on a hypervisor host, as a client of the
//! storage nodes. Thin: parse flags, connect, bind, serve until SIGTERM or SIGINT.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use tern_common::runtime::{self, RuntimeOptions};
use tern_nbd_frontend::grpc::GrpcBackend;
use tern_nbd_frontend::{serve, Metrics, ServerOptions};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tracing::info;

/// mimalloc: small allocations (request buffers, log entries, messages) on every I/O; glibc's
/// malloc cost about a tenth of a node's CPU under 4 KiB random writes.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "tern-nbd-frontend", version, about = "Serves Tern volumes over NBD")]
struct Args {
    /// Address the NBD server listens on.
    #[arg(long, default_value = "127.0.0.1:10809")]
    listen: SocketAddr,
    /// gRPC endpoints of the storage nodes, separated by commas. One is enough: the others of a
    /// cluster are learned from it; more are tried in order when the first is down. Default:
    /// the storage cluster's members as the volume manager (--manager) knows them, or else
    /// http://127.0.0.1:7700.
    #[arg(long, env = "TERN_STORAGE")]
    storage: Option<String>,
    /// Volume manager replicas (gRPC endpoints, comma-separated): when given, every export is
    /// attached to this host (--host) through the manager before it is served, and writes
    /// carry the attachment's fencing generation.
    #[arg(long, env = "TERN_MANAGER")]
    manager: Option<String>,
    /// This hypervisor host's name for attachments (default: the system hostname).
    #[arg(long, env = "TERN_HOST")]
    host: Option<String>,
    /// The datacenter this host is in (a storage cluster's datacenter label). Replicated
    /// volumes' chunk groups then move their leaders here, where their requests come from.
    #[arg(long, env = "TERN_DATACENTER")]
    datacenter: Option<String>,
    /// Tokio worker threads (default: half the cores, at least one). The frontend shares its
    /// host with the VMs it serves, and one thread carries tens of thousands of 4 KiB requests
    /// a second; on the 2-core test machine one worker also answered a 4 KiB read at queue
    /// depth 1 in 93-98 us against 134-136 us with two (fewer cross-thread wake-ups).
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
    /// Serve Prometheus metrics at http://HOST:PORT/metrics (none without it).
    #[arg(long, value_name = "HOST:PORT")]
    metrics_listen: Option<SocketAddr>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tern_common::init_logging();
    let opts = RuntimeOptions {
        worker_threads: Some(args.worker_threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, |n| n.get().div_ceil(2))
        })),
        poll: args.poll,
        poll_budget: f64::from(args.poll_budget) / 100.0,
    };
    runtime::build(opts).context("starting the tokio runtime")?.block_on(run(args))
}

/// The storage cluster's members as the volume manager knows them, as `http://` endpoints;
/// waits until the manager knows some (it forms the cluster once three datacenters have
/// nodes up).
async fn storage_from_manager(managers: &str) -> String {
    use tern_proto::v1::{manager_client::ManagerClient, ListNodesRequest};
    let mut tries = 0u32;
    loop {
        for m in managers.split(',').map(str::trim) {
            let uri = if m.contains("://") { m.to_string() } else { format!("http://{m}") };
            let Ok(ep) = tonic::transport::Endpoint::from_shared(uri) else { continue };
            let ch = ep.connect_timeout(std::time::Duration::from_secs(1)).connect_lazy();
            if let Ok(r) = ManagerClient::new(ch).list_nodes(ListNodesRequest {}).await {
                let members: Vec<String> = r
                    .into_inner()
                    .nodes
                    .into_iter()
                    .filter(|n| n.member)
                    .map(|n| format!("http://{}", n.address))
                    .collect();
                if !members.is_empty() {
                    return members.join(",");
                }
            }
        }
        if tries.is_multiple_of(10) {
            info!(%managers, "waiting for the volume manager to know the storage cluster");
        }
        tries += 1;
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(dc) = &args.datacenter {
        tern_nbd_frontend::grpc::set_datacenter(dc)
            .map_err(|e| anyhow::anyhow!("--datacenter: {e}"))?;
    }
    let storage = match (&args.storage, &args.manager) {
        (Some(s), _) => s.clone(),
        (None, Some(m)) => storage_from_manager(m).await,
        (None, None) => "http://127.0.0.1:7700".to_string(),
    };
    let backend = match &args.manager {
        None => GrpcBackend::connect_lazy(&storage),
        Some(managers) => {
            let host = match &args.host {
                Some(h) => h.clone(),
                None => std::fs::read_to_string("/etc/hostname")
                    .map(|h| h.trim().to_string())
                    .context("--host not given and /etc/hostname unreadable")?,
            };
            anyhow::ensure!(!host.is_empty(), "--host must not be empty");
            info!(%host, %managers, "attaching exports through the volume manager");
            GrpcBackend::connect_lazy_attaching(&storage, managers, &host)
        }
    }
    .with_context(|| format!("invalid storage endpoint in {storage:?}"))?;
    let metrics = Metrics::new();
    backend.register_metrics(metrics.registry()).context("registering the backend's metrics")?;
    if let Some(addr) = args.metrics_listen {
        tern_common::metrics::spawn(addr, metrics.registry().clone())
            .await
            .with_context(|| format!("binding the metrics endpoint {addr}"))?;
    }
    let listener =
        TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    info!(%storage, "listening on {}", listener.local_addr()?);
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        result = serve(listener, backend, ServerOptions { metrics, ..ServerOptions::default() }) => {
            result.context("serving NBD")?;
        }
        _ = term.recv() => info!("SIGTERM received, exiting"),
        result = tokio::signal::ctrl_c() => {
            result.context("waiting for SIGINT")?;
            info!("SIGINT received, exiting");
        }
    }
    Ok(())
}
