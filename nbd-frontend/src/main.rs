//! `tern-nbd-frontend`: serves Tern volumes over NBD on a hypervisor host, as a client of the
//! storage nodes. Thin: parse flags, connect, bind, serve until SIGTERM or SIGINT.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use tern_nbd_frontend::grpc::GrpcBackend;
use tern_nbd_frontend::{serve, ServerOptions};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tracing::info;

#[derive(Debug, Parser)]
#[command(name = "tern-nbd-frontend", version, about = "Serves Tern volumes over NBD")]
struct Args {
    /// Address the NBD server listens on.
    #[arg(long, default_value = "127.0.0.1:10809")]
    listen: SocketAddr,
    /// gRPC endpoints of the storage nodes, separated by commas. One is enough: the others of a
    /// cluster are learned from it; more are tried in order when the first is down.
    #[arg(long, env = "TERN_STORAGE", default_value = "http://127.0.0.1:7700")]
    storage: String,
    /// Tokio worker threads (default: one per core).
    #[arg(long, env = "TERN_WORKER_THREADS")]
    worker_threads: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.worker_threads {
        rt.worker_threads(n.max(1));
    }
    rt.enable_all().build().context("starting the tokio runtime")?.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    tern_common::init_logging();
    let backend = GrpcBackend::connect_lazy(&args.storage)
        .with_context(|| format!("invalid storage endpoint in {:?}", args.storage))?;
    let listener =
        TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    info!(storage = %args.storage, "listening on {}", listener.local_addr()?);
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        result = serve(listener, backend, ServerOptions::default()) => {
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
