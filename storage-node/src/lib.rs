//! Tern's storage node: a chunk store serving volumes over gRPC.
//!
//! Volumes are split into 64 MiB chunks; each chunk has a data file of 4 KiB slots written
//! through an [`engine::IoEngine`] (io_uring, or its synchronous twin), and a block map in
//! RocksDB ([`meta`], key layout in [`keys`]) that says, per block, which slot holds it and its
//! crc32c. [`store::ChunkStore`] implements the data path; [`service`] exposes it as the
//! `BlockIo` and `VolumeAdmin` gRPC services, and `lane` serves the data lanes (the `BlockIo.Io`
//! stream without HTTP/2) on the same port; [`metrics`] says how it goes, at `/metrics`.

pub mod aligned;
pub mod chunk;
pub mod engine;
pub mod epoch;
pub mod error;
pub mod fullness;
pub mod keys;
mod lane;
pub mod manager_link;
pub mod meta;
pub mod metrics;
pub mod replication;
pub mod service;
pub mod store;

pub use error::{Error, Result};

use std::net::SocketAddr;
use std::sync::Arc;

use tern_proto::v1::{
    block_io_server::BlockIoServer, cluster_server::ClusterServer,
    raft_transport_server::RaftTransportServer, volume_admin_server::VolumeAdminServer,
};

/// Serves the node's gRPC services on `addr` until `shutdown` resolves, and its metrics at
/// `http://<metrics_addr>/metrics` if given.
pub async fn serve(
    store: Arc<store::ChunkStore>,
    addr: SocketAddr,
    node_id: u64,
    datacenter: String,
    cluster: Option<Arc<replication::Cluster>>,
    metrics_addr: Option<SocketAddr>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    let listener =
        tokio::net::TcpListener::bind(addr).await.map_err(|source| Error::Bind { addr, source })?;
    let metrics = metrics::NodeMetrics::new(store.clone(), cluster.clone(), node_id, &datacenter);
    if let Some(addr) = metrics_addr {
        tern_common::metrics::spawn(addr, metrics.registry().clone())
            .await
            .map_err(|source| Error::Bind { addr, source })?;
    }
    let _bg = store.spawn_background();
    let svc =
        service::Service::new(store.clone(), node_id, datacenter, cluster.clone(), metrics.io());
    let transport = cluster.map(|cluster| {
        RaftTransportServer::new(replication::transport::TransportService { cluster })
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(256 << 20)
    });
    tracing::info!(addr = %listener.local_addr().map_or(addr, |a| a), "storage node listening");
    // One port for both: data lanes are served by `lane`, every other connection (gRPC) is
    // handed on to tonic. Lanes stop taking requests when `lanes_stop` turns true.
    let (lanes_stop, lanes_stopped) = tokio::sync::watch::channel(false);
    let lanes = lane::Lanes::new(metrics.io().lanes.clone());
    let incoming = tokio_stream::wrappers::ReceiverStream::new(lane::accept(
        listener,
        svc.clone(),
        lanes_stopped,
        lanes.clone(),
    ));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        // A peer's Raft stream carries all its appends on one HTTP/2 stream: let several
        // 8 MiB batches be in flight on it.
        .initial_stream_window_size(Some(32 << 20))
        .initial_connection_window_size(Some(64 << 20))
        // Large frames: a 1 MiB write arrives in a few frames instead of 64 of 16 KiB.
        .max_frame_size(Some(1 << 20))
        .add_service(
            BlockIoServer::new(svc.clone())
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
        )
        .add_service(VolumeAdminServer::new(svc.clone()))
        .add_service(ClusterServer::new(svc))
        .add_optional_service(transport)
        .serve_with_incoming_shutdown(incoming, async {
            let _ = stop_rx.await;
        });
    tokio::pin!(server);
    let r = tokio::select! {
        r = &mut server => r,
        () = shutdown => {
            let _ = stop_tx.send(());
            let _ = lanes_stop.send(true);
            // Frontends keep their connections open, which would hold a graceful shutdown
            // forever: give in-flight requests a moment, then stop.
            let both = async { tokio::join!(&mut server, lanes.drained()).0 };
            match tokio::time::timeout(std::time::Duration::from_secs(3), both).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::info!("connections still open after 3 s; stopping anyway");
                    Ok(())
                }
            }
        }
    };
    // Whatever was acknowledged is already in the WAL; make it durable before exiting.
    if let Err(e) = store.barrier().await {
        tracing::error!(%e, "final barrier failed");
    }
    r.map_err(Error::Serve)
}

#[cfg(test)]
mod store_tests;
