//! A storage node's link to the volume manager (`--manager`): it registers at start (id,
//! address, datacenter, capacity), then sends a heartbeat every second. The manager marks a
//! node down when its heartbeats stop, and up again with the next one.
//!
//! Any manager replica will do (followers forward to the leader); the node tries them in
//! turn. Losing the managers never stops the data path: the link only retries.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tern_proto::v1::{self, manager_client::ManagerClient};
use tonic::transport::Channel;
use tonic::Code;

use crate::store::ChunkStore;

const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

pub struct ManagerLink {
    pub managers: Vec<String>,
    pub node_id: u64,
    /// `host:port` others reach this node's gRPC services at.
    pub address: String,
    pub datacenter: String,
    pub data_dir: PathBuf,
    pub store: Arc<ChunkStore>,
}

/// Size of the filesystem holding `dir`, in bytes (0 if it cannot be told).
fn filesystem_bytes(dir: &std::path::Path) -> u64 {
    crate::metrics::fs_usage(dir).map_or(0, |u| u.size)
}

fn channel(address: &str) -> Option<Channel> {
    let uri =
        if address.contains("://") { address.to_string() } else { format!("http://{address}") };
    Some(
        Channel::from_shared(uri)
            .ok()?
            .connect_timeout(Duration::from_millis(500))
            .timeout(Duration::from_secs(10))
            .connect_lazy(),
    )
}

/// The storage cluster as the volume manager formed it.
pub struct ManagerClusterConfig {
    pub members: Vec<v1::NodeInfo>,
    pub groups: u32,
    pub join: bool,
    /// Voters of groups `0..=groups`; empty when the manager sent none or an incomplete one.
    pub placement: Vec<Vec<u64>>,
}

/// The placement by group index, if it covers every group exactly once.
fn placement_of(p: &[v1::GroupVoters], groups: u32) -> Vec<Vec<u64>> {
    let mut out = vec![Vec::new(); groups as usize + 1];
    for g in p {
        match out.get_mut(g.group as usize) {
            Some(slot) if slot.is_empty() => *slot = g.voters.clone(),
            _ => return Vec::new(),
        }
    }
    if out.iter().any(Vec::is_empty) {
        return Vec::new();
    }
    out
}

impl ManagerLink {
    fn used(&self) -> u64 {
        self.store.list().iter().map(|v| v.allocated_bytes()).sum()
    }

    async fn register(&self) -> Result<(), String> {
        let mut last = String::from("no manager address");
        for m in &self.managers {
            let Some(ch) = channel(m) else {
                last = format!("bad manager address {m:?}");
                continue;
            };
            let req = v1::RegisterNodeRequest {
                id: self.node_id,
                address: self.address.clone(),
                datacenter: self.datacenter.clone(),
                capacity_bytes: filesystem_bytes(&self.data_dir),
                used_bytes: self.used(),
            };
            match ManagerClient::new(ch).register_node(req).await {
                Ok(_) => {
                    tracing::info!(manager = %m, "registered with the volume manager");
                    return Ok(());
                }
                // Refused for good (e.g. the id belongs to another datacenter): say so loudly.
                Err(s)
                    if matches!(
                        s.code(),
                        Code::FailedPrecondition | Code::AlreadyExists | Code::InvalidArgument
                    ) =>
                {
                    return Err(format!("the volume manager refused this node: {}", s.message()))
                }
                Err(s) => last = format!("{m}: {}", s.message()),
            }
        }
        Err(last)
    }

    /// Registers (retrying until a manager answers), then asks for the storage cluster this
    /// node belongs to until the manager has formed it (nodes of three datacenters up).
    /// Returns (members, chunk groups, whether this node joins as a spare, placement).
    pub async fn cluster_config(&self) -> Result<ManagerClusterConfig, String> {
        let mut tries = 0u32;
        loop {
            if tries > 0 {
                tokio::time::sleep(HEARTBEAT_EVERY).await;
            }
            tries += 1;
            if let Err(e) = self.register().await {
                if e.starts_with("the volume manager refused") {
                    return Err(e);
                }
                if tries % 10 == 1 {
                    tracing::warn!("registering with the volume manager: {e}");
                }
                continue;
            }
            let mut last = String::new();
            for m in &self.managers {
                let Some(ch) = channel(m) else { continue };
                let req = v1::GetClusterConfigRequest { node_id: self.node_id };
                match ManagerClient::new(ch).get_cluster_config(req).await {
                    Ok(c) => {
                        let c = c.into_inner();
                        return Ok(ManagerClusterConfig {
                            placement: placement_of(&c.placement, c.groups),
                            members: c.members,
                            groups: c.groups,
                            join: c.join,
                        });
                    }
                    Err(s) => last = format!("{m}: {}", s.message()),
                }
            }
            if tries % 10 == 1 {
                tracing::info!("waiting for the storage cluster to form: {last}");
            }
        }
    }

    /// Registers (unless `registered` already, e.g. by [`Self::cluster_config`]), then
    /// heartbeats until the process ends.
    pub async fn run(self, registered: bool) {
        let mut registered = registered;
        let mut failures = 0u32;
        let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !registered {
                match self.register().await {
                    Ok(()) => registered = true,
                    Err(e) => {
                        // Every 10 s, not every second.
                        if failures.is_multiple_of(10) {
                            tracing::warn!("registering with the volume manager: {e}");
                        }
                        failures += 1;
                    }
                }
                continue;
            }
            let req = v1::HeartbeatRequest {
                node_id: self.node_id,
                capacity_bytes: filesystem_bytes(&self.data_dir),
                used_bytes: self.used(),
                full: self.store.fullness.local(),
            };
            let mut ok = false;
            for m in &self.managers {
                let Some(ch) = channel(m) else { continue };
                match ManagerClient::new(ch).heartbeat(req).await {
                    Ok(r) => {
                        self.store.fullness.set_cluster_full(r.into_inner().cluster_full);
                        ok = true;
                        break;
                    }
                    Err(s) if s.code() == Code::NotFound => {
                        registered = false;
                        ok = true;
                        break;
                    }
                    Err(_) => {}
                }
            }
            if !ok {
                if failures.is_multiple_of(10) {
                    tracing::warn!("no volume manager replica answers heartbeats");
                }
                failures += 1;
            }
        }
    }
}
