//! The NBD server over the in-memory backend, for trying real clients against the protocol
//! layer without a storage node:
//! `cargo run -p tern-nbd-frontend --example mem_server -- 127.0.0.1:10809` serves a writable
//! 64 MiB `vol` and a read-only 1 MiB `ro` (`nbdinfo nbd://127.0.0.1:10809/vol`).

use tern_nbd_frontend::backend::MemBackend;
use tern_nbd_frontend::{serve, ServerOptions};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tern_common::init_logging();
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:10809".into());
    let backend = MemBackend::new();
    backend.add(1, "vol", 64 << 20, false);
    backend.add(2, "ro", 1 << 20, true);
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    tracing::info!("listening on {}", listener.local_addr()?);
    serve(listener, backend, ServerOptions::default()).await?;
    Ok(())
}
