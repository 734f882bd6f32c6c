//! gRPC definitions shared by Tern's daemons and the `tern` CLI, and the data lanes' framing
//! ([`lane`]).
//!
//! The generated code lives in [`v1`]. Daemons convert between these wire types and their own
//! domain types at their service boundary, in one place per type; domain types never derive
//! `prost::Message`.
#![forbid(unsafe_code)]

/// Generated protobuf and tonic code for package `tern.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("tern.v1");
}

pub mod lane;
