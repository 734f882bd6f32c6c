//! Tern's NBD frontend: runs on each hypervisor host and serves every volume as an NBD export
//! (fixed newstyle handshake, structured replies, `base:allocation`, multi-conn), as a network
//! client of the storage nodes.
//!
//! Code map: [`codec`] is the wire format as pure functions (fuzzed and property-tested);
//! [`server`] accepts connections and runs each through `handshake` (option haggling) and
//! `transmission` (the request loop, the hot path) against a [`backend::Backend`], which is
//! [`grpc::GrpcBackend`] in production and `MemBackend` in tests. [`metrics`] counts
//! connections and requests for `/metrics`.
#![forbid(unsafe_code)]

pub mod backend;
pub mod codec;
pub mod grpc;
mod handshake;
pub mod metrics;
pub mod server;
mod transmission;

pub use metrics::Metrics;
pub use server::{serve, ServerOptions};
