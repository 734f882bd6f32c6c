//! Tern's volume manager: the replicated control plane.
//!
//! Three replicas (one per datacenter) form one Raft group ([`raft`]); their replicated
//! [`state`] holds the storage nodes, the volumes and the attachments. The gRPC [`service`]
//! answers on any replica (followers forward to the leader). The leader also watches storage
//! node heartbeats ([`monitor`]) and creates volume records on the storage cluster
//! ([`storage`]).
#![forbid(unsafe_code)]

pub mod metrics;
pub mod monitor;
pub mod raft;
pub mod service;
pub mod state;
pub mod storage;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use parking_lot::RwLock;
use tern_common::NodeAddr;

use crate::raft::{log_store::LogStore, network::Network, state_machine::StateMachine, Member};

/// Opens (or creates) a replica in `data_dir` and starts its Raft. The replica with the lowest
/// id of `peers` initializes the group on first start.
pub async fn start(
    id: u64,
    peers: &[NodeAddr],
    data_dir: &Path,
    groups: u32,
) -> anyhow::Result<Arc<service::Manager>> {
    std::fs::create_dir_all(data_dir)?;
    let log = LogStore::open(&data_dir.join("raft"))?;
    let state = Arc::new(RwLock::new(state::State::default()));
    let sm = StateMachine::open(data_dir, state.clone())?;
    let config = Arc::new(raft::raft_config().validate()?);
    let network = Network::default();
    let raft = raft::Raft::new(id, config, network.clone(), log, sm).await?;
    let lowest = peers.iter().map(|p| p.id).min();
    if lowest == Some(id) && !raft.is_initialized().await? {
        let members: BTreeMap<u64, Member> = peers
            .iter()
            .map(|p| {
                (p.id, Member { address: p.address.clone(), datacenter: p.datacenter.clone() })
            })
            .collect();
        match raft.initialize(members).await {
            Ok(()) => tracing::info!(replicas = peers.len(), "initialized the manager group"),
            Err(e) => tracing::warn!("initializing the manager group: {e}"),
        }
    }
    Ok(service::Manager::new(id, groups, raft, state, network))
}
