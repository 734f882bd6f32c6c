//! What every Tern daemon does alike (they all build `tern-common` with the `metrics`
//! feature, which brings tokio).

/// Resolves on SIGTERM or SIGINT (logging "shutting down").
pub async fn shutdown_signal() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        // No SIGTERM handler (never seen on Linux): Ctrl-C still stops the daemon.
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutting down");
}
