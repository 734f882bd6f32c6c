//! The manager's client of the storage cluster: volume records are created, resized and
//! deleted on the storage nodes (their meta group) through `VolumeAdmin`, at any registered
//! node that is up (a node forwards to its meta group's leader).

use std::time::Duration;

use tern_proto::v1::{self, cluster_client::ClusterClient, volume_admin_client::VolumeAdminClient};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Each storage node gets this long to answer before the next one is tried.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

fn channel(address: &str) -> Result<Channel, Status> {
    Ok(Channel::from_shared(format!("http://{address}"))
        .map_err(|e| Status::internal(format!("storage node address {address:?}: {e}")))?
        .connect_timeout(Duration::from_millis(500))
        .timeout(CALL_TIMEOUT)
        .connect_lazy())
}

/// Tries `call` on each address in turn until one answers with anything but `Unavailable`
/// (or a transport failure, which tonic reports as `Unavailable` too).
pub async fn first_answer<T, F, Fut>(addresses: &[String], mut call: F) -> Result<T, Status>
where
    F: FnMut(Channel) -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    if addresses.is_empty() {
        return Err(Status::unavailable(
            "no storage node is registered and up: start storage nodes with --manager",
        ));
    }
    let mut last = None;
    for a in addresses {
        match call(channel(a)?).await {
            Err(s) if matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded) => {
                last = Some(Status::unavailable(format!("storage node {a}: {}", s.message())));
            }
            other => return other,
        }
    }
    Err(last.expect("at least one address was tried"))
}

pub async fn create_volume(
    addresses: &[String],
    req: v1::CreateVolumeRequest,
) -> Result<v1::Volume, Status> {
    first_answer(addresses, |ch| {
        let req = req.clone();
        async move { Ok(VolumeAdminClient::new(ch).create_volume(req).await?.into_inner()) }
    })
    .await
}

pub async fn get_volume(addresses: &[String], r: v1::VolumeRef) -> Result<v1::Volume, Status> {
    first_answer(addresses, |ch| {
        let req = v1::GetVolumeRequest { volume: Some(r.clone()) };
        async move { Ok(VolumeAdminClient::new(ch).get_volume(req).await?.into_inner()) }
    })
    .await
}

pub async fn list_volumes(addresses: &[String]) -> Result<Vec<v1::Volume>, Status> {
    first_answer(addresses, |ch| async move {
        Ok(VolumeAdminClient::new(ch)
            .list_volumes(v1::ListVolumesRequest {})
            .await?
            .into_inner()
            .volumes)
    })
    .await
}

pub async fn resize_volume(
    addresses: &[String],
    req: v1::ResizeVolumeRequest,
) -> Result<v1::Volume, Status> {
    first_answer(addresses, |ch| {
        let req = req.clone();
        async move { Ok(VolumeAdminClient::new(ch).resize_volume(req).await?.into_inner()) }
    })
    .await
}

pub async fn update_volume(
    addresses: &[String],
    req: v1::UpdateVolumeRequest,
) -> Result<v1::Volume, Status> {
    first_answer(addresses, |ch| {
        let req = req.clone();
        async move { Ok(VolumeAdminClient::new(ch).update_volume(req).await?.into_inner()) }
    })
    .await
}

pub async fn delete_volume(addresses: &[String], id: u64) -> Result<(), Status> {
    first_answer(addresses, |ch| async move {
        let req = v1::DeleteVolumeRequest {
            volume: Some(v1::VolumeRef { r#ref: Some(v1::volume_ref::Ref::Id(id)) }),
        };
        VolumeAdminClient::new(ch).delete_volume(req).await?;
        Ok(())
    })
    .await
}

/// The cluster map, merged from every node at `addresses` that answers: a node knows the
/// leaders of the groups it holds replicas of only. Per group, a known leader wins over
/// none (a replica moved away may still campaign, at ever higher terms), then the newest term.
pub async fn cluster_map(addresses: &[String]) -> Result<v1::ClusterMap, Status> {
    // All at once, each within a short time: a frozen node must not hold up a status call.
    const MAP_TIMEOUT: Duration = Duration::from_secs(2);
    let asks = addresses.iter().map(|a| async move {
        let mut c = ClusterClient::new(channel(a)?);
        let call = c.get_cluster_map(v1::GetClusterMapRequest {});
        match tokio::time::timeout(MAP_TIMEOUT, call).await {
            Ok(r) => Ok(r?.into_inner()),
            Err(_) => Err(Status::unavailable(format!("storage node {a}: no map within 2 s"))),
        }
    });
    let mut merged: Option<v1::ClusterMap> = None;
    let mut last = Status::unavailable("no storage node address");
    for map in futures::future::join_all(asks).await {
        let map = match map {
            Ok(m) => m,
            Err(s) => {
                last = s;
                continue;
            }
        };
        let Some(out) = merged.as_mut() else {
            merged = Some(map);
            continue;
        };
        for g in map.group_state {
            match out.group_state.iter_mut().find(|o| o.group == g.group) {
                Some(o) => {
                    if (g.leader != 0, g.term) > (o.leader != 0, o.term) {
                        *o = g;
                    }
                }
                None => out.group_state.push(g),
            }
        }
        for n in map.nodes {
            if !out.nodes.iter().any(|o| o.id == n.id) {
                out.nodes.push(n);
            }
        }
    }
    merged.ok_or(last)
}

/// Raises the volume's fence to `generation` in every chunk group (see `Cluster.FenceVolume`).
pub async fn fence_volume(addresses: &[String], id: u64, generation: u64) -> Result<(), Status> {
    first_answer(addresses, |ch| async move {
        let req = v1::FenceVolumeRequest { volume_id: id, generation };
        ClusterClient::new(ch).fence_volume(req).await?;
        Ok(())
    })
    .await
}

/// What to do with a snapshot in every chunk group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapOp {
    Create,
    Delete,
    Rollback,
    Flatten,
}

/// Commits the creation of, a rollback to or the deletion of the snapshot at `epochs[0]` in
/// every chunk group; a deletion may name several snapshots, dropped in one entry per group
/// (see `Cluster.SnapshotVolume`).
pub async fn snapshot_volume(
    addresses: &[String],
    id: u64,
    epochs: &[u64],
    op: SnapOp,
) -> Result<(), Status> {
    let Some((&epoch, more)) = epochs.split_first() else {
        return Err(Status::internal("a snapshot operation without an epoch"));
    };
    first_answer(addresses, |ch| async move {
        let req = v1::SnapshotVolumeRequest {
            volume_id: id,
            epoch,
            more_epochs: more.to_vec(),
            delete: op == SnapOp::Delete,
            rollback: op == SnapOp::Rollback,
            flatten: op == SnapOp::Flatten,
            group: None,
        };
        ClusterClient::new(ch).snapshot_volume(req).await?;
        Ok(())
    })
    .await
}

/// The ranges that differ between two epochs (see `Cluster.VolumeChanges`).
pub async fn volume_changes(
    addresses: &[String],
    id: u64,
    from: u64,
    to: u64,
) -> Result<Vec<v1::ChangedExtent>, Status> {
    first_answer(addresses, |ch| async move {
        let req =
            v1::VolumeChangesRequest { volume_id: id, from_epoch: from, to_epoch: to, group: None };
        Ok(ClusterClient::new(ch).volume_changes(req).await?.into_inner().extents)
    })
    .await
}

/// The space a volume's versions hold (see `Cluster.VolumeUsage`).
pub async fn volume_usage(addresses: &[String], id: u64) -> Result<v1::VolumeUsageReply, Status> {
    first_answer(addresses, |ch| async move {
        let req = v1::VolumeUsageRequest { volume_id: id, group: None };
        Ok(ClusterClient::new(ch).volume_usage(req).await?.into_inner())
    })
    .await
}

/// Asks the storage node at `address` to move every replica of `old` to `new` (it drives the
/// move; asking again resumes, skipping groups already moved). Returns its progress.
pub async fn replace_node(
    address: &str,
    old: u64,
    new: v1::NodeInfo,
    groups: Vec<u32>,
) -> Result<v1::ReplacementStatus, Status> {
    let req = v1::ReplaceNodeRequest { old, new: Some(new), groups };
    Ok(ClusterClient::new(channel(address)?).replace_node(req).await?.into_inner())
}

/// The progress of the replacement the storage node at `address` drives.
pub async fn replacement(address: &str) -> Result<v1::ReplacementStatus, Status> {
    let req = v1::GetReplacementRequest {};
    Ok(ClusterClient::new(channel(address)?).get_replacement(req).await?.into_inner())
}

/// Groups being moved by a replacement some node drives, summed over `addresses`.
pub async fn groups_rebuilding(addresses: &[String]) -> u32 {
    let asks = addresses.iter().map(|a| async move {
        let mut c = ClusterClient::new(channel(a).ok()?);
        let call = c.get_replacement(v1::GetReplacementRequest {});
        let r = tokio::time::timeout(Duration::from_secs(2), call).await.ok()?.ok()?.into_inner();
        (r.active && !r.finished).then(|| r.groups_total.saturating_sub(r.groups_done))
    });
    futures::future::join_all(asks).await.into_iter().flatten().sum()
}
