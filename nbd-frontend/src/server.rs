//! The NBD server: accepts TCP connections and runs each one in its own task, first through
//! the handshake ([`crate::handshake`]) and then through the transmission phase
//! ([`crate::transmission`]).
//!
//! **Invariant:** a connection's failure (error or panic) ends that connection only. Each runs
//! in its own tokio task, so a panic unwinds that task alone; errors are logged at `debug`
//! (clients going away) or `warn` (protocol violations, I/O failures), never per request at
//! `info`.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tern_common::MAX_IO_SIZE;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::backend::{Backend, BackendError};
use crate::codec::CodecError;
use crate::handshake::{self, Negotiated};
use crate::metrics::Metrics;
use crate::transmission;

/// Tunables of the server. `Default` gives the production values.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Requests of one connection being served at once; the connection stops reading from its
    /// socket while this many are in flight (backpressure). At least 1.
    pub max_in_flight: usize,
    /// READ and WRITE payload bytes one connection holds in memory at once, the same kind of
    /// backpressure for large requests. Never less than one maximal request (32 MiB).
    pub max_in_flight_bytes: usize,
    /// Where connections and requests are counted (the default: a registry nobody serves).
    pub metrics: Metrics,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self { max_in_flight: 128, max_in_flight_bytes: 256 << 20, metrics: Metrics::default() }
    }
}

impl ServerOptions {
    /// The options with their floors applied, so no request can wait forever for credit.
    pub(crate) fn normalized(&self) -> Self {
        Self {
            max_in_flight: self.max_in_flight.max(1),
            max_in_flight_bytes: self.max_in_flight_bytes.max(MAX_IO_SIZE as usize),
            metrics: self.metrics.clone(),
        }
    }
}

/// Why a connection ended other than by the client's NBD_OPT_ABORT, NBD_CMD_DISC or a clean
/// close between messages. Connection errors close the connection; they are never sent to
/// the client (errors that are, are option replies and errnos).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectionError {
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    /// A message that cannot be framed (bad magic): the stream cannot be trusted any more.
    #[error("malformed message: {0}")]
    Malformed(#[from] CodecError),
    #[error("client flags {0:#x} refused: fixed newstyle is required and no unknown flag allowed")]
    ClientFlags(u32),
    #[error("handshake not finished within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("NBD_OPT_EXPORT_NAME for unknown export {0:?}")]
    UnknownExport(String),
    #[error("NBD_OPT_EXPORT_NAME could not look up the export: {0}")]
    Lookup(BackendError),
    #[error("option {option} carries {length} bytes, over the limit of {limit}")]
    OptionTooLarge { option: u32, length: u32, limit: u32 },
    #[error("NBD_CMD_WRITE of {0} bytes is over the 32 MiB limit")]
    WriteTooLarge(u32),
}

impl ConnectionError {
    /// Whether this is the peer simply going away, which is not worth a warning.
    fn is_disconnect(&self) -> bool {
        matches!(
            self,
            ConnectionError::Io(e) if matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionAborted
            )
        )
    }
}

/// Serves NBD on `listener` until the task is dropped, one task per connection. Accept
/// errors (out of file descriptors, a connection reset before it was accepted) are logged
/// and retried after a short pause, so this only returns if the caller drops it.
pub async fn serve<B: Backend>(
    listener: TcpListener,
    backend: B,
    opts: ServerOptions,
) -> io::Result<()> {
    let opts = opts.normalized();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(error = %e, "accepting an NBD connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        tokio::spawn(connection(stream, peer, backend.clone(), opts.clone()));
    }
}

/// How long a client may take from connecting to entering the transmission phase.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// One connection, start to end; logs how it ended.
async fn connection<B: Backend>(
    stream: TcpStream,
    peer: SocketAddr,
    backend: B,
    opts: ServerOptions,
) {
    debug!(%peer, "NBD connection accepted");
    let _open = opts.metrics.connection();
    match run_connection(stream, &backend, &opts).await {
        Ok(()) => debug!(%peer, "NBD connection closed"),
        Err(e) if e.is_disconnect() => debug!(%peer, error = %e, "NBD client went away"),
        Err(e) => warn!(%peer, error = %e, "NBD connection closed on error"),
    }
}

async fn run_connection<B: Backend>(
    mut stream: TcpStream,
    backend: &B,
    opts: &ServerOptions,
) -> Result<(), ConnectionError> {
    // Replies are small and latency-bound; the writer batches them itself.
    stream.set_nodelay(true)?;
    // A client that connects and never finishes negotiating must not hold its task forever.
    let negotiated =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake::negotiate(&mut stream, backend))
            .await
            .map_err(|_| ConnectionError::HandshakeTimeout(HANDSHAKE_TIMEOUT))??;
    match negotiated {
        Negotiated::Aborted => Ok(()),
        Negotiated::Transmission(session) => {
            debug!(export = %session.export.name, flags = session.flags, "NBD transmission phase");
            let (reader, writer) = stream.into_split();
            transmission::run(reader, writer, backend.clone(), session, opts).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_floors() {
        let o = ServerOptions { max_in_flight: 0, max_in_flight_bytes: 0, ..Default::default() }
            .normalized();
        assert_eq!(o.max_in_flight, 1);
        assert_eq!(o.max_in_flight_bytes, 32 << 20);
        let d = ServerOptions::default().normalized();
        assert_eq!((d.max_in_flight, d.max_in_flight_bytes), (128, 256 << 20));
    }

    #[test]
    fn disconnects_are_told_apart_from_failures() {
        let eof = ConnectionError::Io(io::ErrorKind::UnexpectedEof.into());
        assert!(eof.is_disconnect());
        assert!(!ConnectionError::ClientFlags(0).is_disconnect());
        assert!(!ConnectionError::WriteTooLarge(u32::MAX).is_disconnect());
    }
}
