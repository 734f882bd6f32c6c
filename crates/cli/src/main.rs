//! `tern`: the operator's command-line tool. Tables for people, `--json` for scripts.
//!
//! Exit codes: 0 success, 1 server-side failure, 2 bad arguments, 3 not found, 4 already
//! exists, 5 cluster unreachable, 6 refused (precondition, e.g. shrinking without
//! `--allow-shrink`).
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// `println!` that ignores a closed stdout (`tern ... | head` must not panic).
macro_rules! println {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}
use tern_common::{format_size, parse_size, validate_volume_name, validate_volume_size};
use tern_proto::v1::{
    self, cluster_client::ClusterClient, manager_client::ManagerClient,
    volume_admin_client::VolumeAdminClient, volume_ref,
};
use tonic::transport::Channel;

#[derive(Parser, Debug)]
#[command(name = "tern", version, about = "Operate a Tern block storage cluster")]
struct Cli {
    /// gRPC endpoint: a volume manager replica (any; several comma-separated are tried in
    /// turn), or a storage node for node-level commands.
    #[arg(long, global = true, env = "TERN_ENDPOINT", default_value = "http://127.0.0.1:7700")]
    endpoint: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create, list, inspect, resize and delete volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Storage nodes: list them (manager), drain or remove them (manager), one node's
    /// status and replacement (storage node).
    #[command(subcommand)]
    Node(NodeCmd),
    /// The whole deployment (manager).
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Snapshots of replicated volumes: instant, crash-consistent copy-on-write epochs
    /// (manager).
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
}

#[derive(Subcommand, Debug)]
enum SnapshotCmd {
    /// Take a snapshot of a volume, attached and under I/O or not. Instant: nothing is
    /// copied. Named `snap-<epoch>` when no name is given.
    Create { volume: String, name: Option<String> },
    /// List a volume's snapshots.
    List {
        volume: String,
        /// Also show the space each one holds alone (a scan of the volume's block maps).
        #[arg(long)]
        usage: bool,
    },
    /// Show one snapshot.
    Get { volume: String, name: String },
    /// Delete a snapshot: it is gone for readers at once; the chunk groups drop it in the
    /// background (the list shows it `deleting` until then), then reclaim the space only it
    /// held.
    Delete {
        volume: String,
        name: String,
        /// Return only once every chunk group has dropped it.
        #[arg(long)]
        wait: bool,
    },
    /// Roll a volume back to a snapshot (detach it first). Every snapshot stays.
    Rollback { volume: String, name: String },
    /// A new volume NEW from a snapshot, instantly (it shares the snapshot's blocks until it
    /// writes its own; `tern volume flatten NEW` makes it independent).
    Clone { volume: String, name: String, new: String },
    /// The ranges that changed between two snapshots (the blocks an incremental backup
    /// copies): from `--from` (default: nothing, so every allocated range) to `--to`
    /// (default: the volume as it is now).
    Diff {
        volume: String,
        #[arg(long, default_value = "")]
        from: String,
        #[arg(long, default_value = "")]
        to: String,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCmd {
    /// Manager replicas and leader, datacenters, nodes, chunk groups by health, capacity.
    Status,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Class {
    Local,
    Replicated,
}

#[derive(Subcommand, Debug)]
enum VolumeCmd {
    /// Create a volume.
    Create {
        name: String,
        /// Size, e.g. 10G, 512M, 1T (binary units).
        #[arg(long)]
        size: String,
        /// Export it read-only.
        #[arg(long)]
        read_only: bool,
        /// Labels, KEY=VALUE (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// The tenant owning it (default: none).
        #[arg(long, default_value = "")]
        tenant: String,
        /// Storage class: `replicated` (three datacenters; the default on a cluster) or
        /// `local` (one copy; the default on a single node).
        #[arg(long, value_enum)]
        class: Option<Class>,
        /// For a `local` volume on a cluster: the storage node to hold it (default: the
        /// member with the most free space).
        #[arg(long)]
        node: Option<u64>,
    },
    /// List volumes.
    List,
    /// Show one volume.
    Get { name: String },
    /// Change a volume's size. Shrinking discards data past the new end.
    Resize {
        name: String,
        size: String,
        #[arg(long)]
        allow_shrink: bool,
    },
    /// Change a volume's settings.
    Set {
        name: String,
        #[arg(long, action = clap::ArgAction::Set)]
        read_only: Option<bool>,
    },
    /// Delete a volume and all its data.
    Delete { name: String },
    /// Attach a volume to a hypervisor host, exclusively (manager).
    Attach {
        name: String,
        /// The host taking the attachment.
        #[arg(long)]
        host: String,
        /// Take the attachment over from another host: its writes are fenced off.
        #[arg(long)]
        takeover: bool,
    },
    /// Detach a volume from a host (manager).
    Detach {
        name: String,
        #[arg(long)]
        host: String,
    },
    /// List attachments (manager).
    Attachments,
    /// Copy every block a clone still shares with its parent's snapshot into it (manager).
    Flatten { name: String },
}

#[derive(Subcommand, Debug)]
enum NodeCmd {
    /// Show the endpoint storage node's status.
    Status,
    /// List the storage nodes registered with the manager.
    List,
    /// Drain a node: the manager moves its replicas to another node of its datacenter.
    Drain {
        id: u64,
        /// Show progress until the node holds no replicas.
        #[arg(long)]
        wait: bool,
    },
    /// Cancel a drain.
    Undrain { id: u64 },
    /// Mark a node removed for good (its id is never reused).
    Remove { id: u64 },
    /// Move every replica of node OLD (gone for good, or to retire) to a new node of the same
    /// datacenter, started with `tern-storage-node --join`. Shows progress until done; run it
    /// again to resume after an interruption.
    Replace {
        old: u64,
        /// The new node: ID=HOST:PORT@DATACENTER.
        #[arg(long = "with")]
        with: String,
        /// Start it and return at once (`tern node replacement` shows progress).
        #[arg(long)]
        no_wait: bool,
    },
    /// Progress of the node replacement driven by the endpoint node.
    Replacement,
}

/// Parses ID=HOST:PORT@DATACENTER.
fn parse_node_spec(s: &str) -> Result<v1::NodeInfo, String> {
    let n: tern_common::NodeAddr = s.parse()?;
    Ok(v1::NodeInfo { id: n.id, address: n.address, datacenter: n.datacenter })
}

fn print_replacement(json: bool, r: &v1::ReplacementStatus) {
    if json {
        println!(
            "{}",
            serde_json::json!({
                "old": r.old, "new": r.new, "groups_total": r.groups_total,
                "groups_done": r.groups_done, "seconds": r.seconds, "finished": r.finished,
                "active": r.active, "last_error": r.last_error,
            })
        );
    } else if r.old == 0 {
        println!("no node replacement was started on this node");
    } else {
        let state = if r.finished { "done" } else { "moving" };
        let err = if r.last_error.is_empty() || r.finished {
            String::new()
        } else {
            format!(" (retrying: {})", r.last_error)
        };
        println!(
            "{state}: node {} -> node {}: {}/{} chunk groups in {:.1} s{err}",
            r.old, r.new, r.groups_done, r.groups_total, r.seconds
        );
    }
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("label {s:?} is not KEY=VALUE"))?;
    if k.is_empty() {
        return Err(format!("label {s:?} has an empty key"));
    }
    Ok((k.to_string(), v.to_string()))
}

/// A failure with the exit code it maps to.
struct Fail {
    code: u8,
    msg: String,
}

impl Fail {
    fn usage(msg: impl std::fmt::Display) -> Self {
        Self { code: 2, msg: msg.to_string() }
    }
}

impl From<tonic::Status> for Fail {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code;
        let code = match s.code() {
            Code::InvalidArgument | Code::OutOfRange => 2,
            Code::NotFound => 3,
            Code::AlreadyExists => 4,
            Code::Unavailable | Code::DeadlineExceeded => 5,
            Code::FailedPrecondition | Code::PermissionDenied => 6,
            _ => 1,
        };
        let msg = if code == 5 {
            format!("cluster unreachable: {}", s.message())
        } else {
            s.message().to_string()
        };
        Self { code, msg }
    }
}

fn by_name(name: &str) -> Option<v1::VolumeRef> {
    Some(v1::VolumeRef { r#ref: Some(volume_ref::Ref::Name(name.to_string())) })
}

fn volume_json(v: &v1::Volume) -> serde_json::Value {
    serde_json::json!({
        "id": v.id,
        "name": v.name,
        "size_bytes": v.size_bytes,
        "allocated_bytes": v.allocated_bytes,
        "block_size": v.block_size,
        "chunk_size": v.chunk_size,
        "storage_class": storage_class(v.storage_class),
        "read_only": v.read_only,
        "created_at": v.created_at,
        "tenant": v.tenant,
        "labels": v.labels,
        "parent_volume_id": v.parent_volume_id,
        "parent_epoch": v.parent_epoch,
        "home_node": v.home_node,
    })
}

fn storage_class(c: i32) -> &'static str {
    match v1::StorageClass::try_from(c) {
        Ok(v1::StorageClass::Replicated) => "replicated",
        Ok(v1::StorageClass::Local) => "local",
        _ => "unspecified",
    }
}

fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> =
            cells.iter().enumerate().map(|(i, c)| format!("{c:<0$}", w[i])).collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.iter().map(|s| s.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}

fn volume_rows(vs: &[v1::Volume]) -> Vec<Vec<String>> {
    vs.iter()
        .map(|v| {
            vec![
                v.name.clone(),
                v.id.to_string(),
                format_size(v.size_bytes),
                format_size(v.allocated_bytes),
                match v.home_node {
                    0 => storage_class(v.storage_class).to_string(),
                    n => format!("{} (node {n})", storage_class(v.storage_class)),
                },
                if v.read_only { "ro" } else { "rw" }.to_string(),
            ]
        })
        .collect()
}

const VOLUME_HEADER: [&str; 6] = ["NAME", "ID", "SIZE", "ALLOCATED", "CLASS", "MODE"];

fn show_volumes(json: bool, vs: &[v1::Volume]) {
    if json {
        let arr: Vec<_> = vs.iter().map(volume_json).collect();
        println!("{}", serde_json::Value::Array(arr));
    } else {
        print_table(&VOLUME_HEADER, &volume_rows(vs));
    }
}

fn show_volume(json: bool, v: &v1::Volume) {
    if json {
        println!("{}", volume_json(v));
    } else {
        print_table(&VOLUME_HEADER, &volume_rows(std::slice::from_ref(v)));
    }
}

/// Connects to the first of the comma-separated endpoints that answers.
async fn connect(endpoints: &str) -> Result<Channel, Fail> {
    let mut errors = Vec::new();
    for endpoint in endpoints.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let ep = tonic::transport::Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| Fail::usage(format!("bad endpoint {endpoint:?}: {e}")))?
            .connect_timeout(std::time::Duration::from_secs(3));
        match ep.connect().await {
            Ok(ch) => return Ok(ch),
            Err(e) => errors.push(format!("{endpoint}: {e}")),
        }
    }
    if errors.is_empty() {
        return Err(Fail::usage("no endpoint given (--endpoint or TERN_ENDPOINT)"));
    }
    Err(Fail { code: 5, msg: format!("cannot reach {}", errors.join("; ")) })
}

fn node_state(s: i32) -> &'static str {
    match v1::NodeState::try_from(s) {
        Ok(v1::NodeState::Up) => "up",
        Ok(v1::NodeState::Down) => "down",
        Ok(v1::NodeState::Draining) => "draining",
        Ok(v1::NodeState::Removed) => "removed",
        _ => "unknown",
    }
}

fn node_json(n: &v1::StorageNode) -> serde_json::Value {
    serde_json::json!({
        "id": n.id, "address": n.address, "datacenter": n.datacenter,
        "state": node_state(n.state), "capacity_bytes": n.capacity_bytes,
        "used_bytes": n.used_bytes, "registered_at": n.registered_at,
        "heartbeat_age_ms": n.heartbeat_age_ms, "member": n.member, "replicas": n.replicas,
        "full": n.full,
    })
}

fn node_rows(ns: &[v1::StorageNode]) -> Vec<Vec<String>> {
    ns.iter()
        .map(|n| {
            vec![
                n.id.to_string(),
                n.address.clone(),
                n.datacenter.clone(),
                if n.full {
                    format!("{} (full)", node_state(n.state))
                } else {
                    node_state(n.state).to_string()
                },
                if n.member { "member" } else { "spare" }.to_string(),
                n.replicas.to_string(),
                format_size(n.capacity_bytes),
                format_size(n.used_bytes),
                n.heartbeat_age_ms.map_or("-".into(), |ms| format!("{:.1}s", ms as f64 / 1e3)),
            ]
        })
        .collect()
}

const NODE_HEADER: [&str; 9] =
    ["ID", "ADDRESS", "DC", "STATE", "ROLE", "REPLICAS", "CAPACITY", "USED", "HEARD"];

fn show_nodes(json: bool, ns: &[v1::StorageNode]) {
    if json {
        println!("{}", serde_json::Value::Array(ns.iter().map(node_json).collect()));
    } else {
        print_table(&NODE_HEADER, &node_rows(ns));
    }
}

fn attachment_json(a: &v1::Attachment) -> serde_json::Value {
    serde_json::json!({
        "volume": a.volume, "volume_id": a.volume_id, "host": a.host,
        "generation": a.generation, "attached_at": a.attached_at,
    })
}

fn show_attachments(json: bool, atts: &[v1::Attachment]) {
    if json {
        println!("{}", serde_json::Value::Array(atts.iter().map(attachment_json).collect()));
    } else {
        let rows: Vec<Vec<String>> = atts
            .iter()
            .map(|a| vec![a.volume.clone(), a.host.clone(), a.generation.to_string()])
            .collect();
        print_table(&["VOLUME", "HOST", "GENERATION"], &rows);
    }
}

/// Polls the cluster status until node `id` is no longer a member, showing the move.
async fn wait_drained(mgr: &mut ManagerClient<Channel>, json: bool, id: u64) -> Result<(), Fail> {
    let started = std::time::Instant::now();
    loop {
        let s = mgr.cluster_status(v1::ClusterStatusRequest {}).await?.into_inner();
        let member = s.nodes.iter().find(|n| n.id == id).is_some_and(|n| n.member);
        if !member {
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "drained": id, "seconds": started.elapsed().as_secs_f64() })
                );
            } else {
                println!("node {id} drained in {:.1} s", started.elapsed().as_secs_f64());
            }
            return Ok(());
        }
        if !json {
            match &s.moving {
                Some(mv) if mv.old == id => println!(
                    "moving node {} -> node {}: {} chunk groups still moving ({:.0} s)",
                    mv.old,
                    mv.new,
                    s.groups_rebuilding,
                    started.elapsed().as_secs_f64()
                ),
                _ => println!(
                    "waiting for a spare node in node {id}'s datacenter ({:.0} s)",
                    started.elapsed().as_secs_f64()
                ),
            }
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

async fn set_node_state(
    mgr: &mut ManagerClient<Channel>,
    json: bool,
    id: u64,
    state: v1::NodeState,
) -> Result<(), Fail> {
    let req = v1::SetNodeStateRequest { node_id: id, state: state as i32 };
    let n = mgr.set_node_state(req).await?.into_inner();
    show_nodes(json, std::slice::from_ref(&n));
    Ok(())
}

fn show_cluster(json: bool, s: &v1::ClusterStatusResponse) {
    if json {
        let managers: Vec<_> = s
            .managers
            .iter()
            .map(|m| serde_json::json!({"id": m.id, "address": m.address, "datacenter": m.datacenter, "leader": m.id == s.leader}))
            .collect();
        let dcs: Vec<_> = s
            .datacenters
            .iter()
            .map(|d| serde_json::json!({"name": d.name, "nodes": d.nodes, "nodes_up": d.nodes_up, "capacity_bytes": d.capacity_bytes, "used_bytes": d.used_bytes}))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "managers": managers, "leader": s.leader, "term": s.term, "datacenters": dcs,
                "nodes": s.nodes.iter().map(node_json).collect::<Vec<_>>(),
                "volumes": s.volumes, "attachments": s.attachments,
                "groups": {"total": s.groups, "healthy": s.groups_healthy,
                           "degraded": s.groups_degraded, "rebuilding": s.groups_rebuilding},
                "storage_error": s.storage_error,
                "moving": s.moving.as_ref().map(|mv| serde_json::json!({
                    "old": mv.old, "new": mv.new, "reason": mv.reason, "started_at": mv.started_at,
                })),
            })
        );
        return;
    }
    println!("managers (leader {} in term {}):", s.leader, s.term);
    let rows: Vec<Vec<String>> = s
        .managers
        .iter()
        .map(|m| {
            let role = if m.id == s.leader { "leader" } else { "follower" };
            vec![m.id.to_string(), m.address.clone(), m.datacenter.clone(), role.into()]
        })
        .collect();
    print_table(&["ID", "ADDRESS", "DC", "ROLE"], &rows);
    println!();
    let rows: Vec<Vec<String>> = s
        .datacenters
        .iter()
        .map(|d| {
            vec![
                d.name.clone(),
                format!("{}/{}", d.nodes_up, d.nodes),
                format_size(d.capacity_bytes),
                format_size(d.used_bytes),
            ]
        })
        .collect();
    print_table(&["DATACENTER", "NODES_UP", "CAPACITY", "USED"], &rows);
    println!();
    print_table(&NODE_HEADER, &node_rows(&s.nodes));
    println!();
    if s.storage_error.is_empty() {
        println!(
            "chunk groups: {} ({} healthy, {} degraded, {} rebuilding)",
            s.groups, s.groups_healthy, s.groups_degraded, s.groups_rebuilding
        );
    } else {
        println!("chunk groups: unknown ({})", s.storage_error);
    }
    if let Some(mv) = &s.moving {
        println!("moving: node {} -> node {} ({})", mv.old, mv.new, mv.reason);
    }
    println!("volumes: {}, attachments: {}", s.volumes, s.attachments);
}

async fn run(cli: Cli) -> Result<(), Fail> {
    // Validate arguments before touching the network: bad input gets a clear message fast.
    match &cli.cmd {
        Cmd::Volume(VolumeCmd::Create { name, size, .. }) => {
            validate_volume_name(name).map_err(Fail::usage)?;
            validate_volume_size(parse_size(size).map_err(Fail::usage)?).map_err(Fail::usage)?;
        }
        Cmd::Volume(VolumeCmd::Resize { size, .. }) => {
            validate_volume_size(parse_size(size).map_err(Fail::usage)?).map_err(Fail::usage)?;
        }
        _ => {}
    }
    if let Cmd::Node(NodeCmd::Replace { with, .. }) = &cli.cmd {
        parse_node_spec(with).map_err(Fail::usage)?;
    }
    if let Cmd::Snapshot(SnapshotCmd::Create { name: Some(name), .. }) = &cli.cmd {
        validate_volume_name(name).map_err(|e| Fail::usage(format!("bad snapshot name: {e}")))?;
    }
    if let Cmd::Snapshot(SnapshotCmd::Clone { new, .. }) = &cli.cmd {
        validate_volume_name(new).map_err(Fail::usage)?;
    }
    let channel = connect(&cli.endpoint).await?;
    let mut c = VolumeAdminClient::new(channel.clone());
    let mut mgr = ManagerClient::new(channel.clone());
    let json = cli.json;
    match cli.cmd {
        Cmd::Cluster(ClusterCmd::Status) => {
            let s = mgr.cluster_status(v1::ClusterStatusRequest {}).await?.into_inner();
            show_cluster(json, &s);
        }
        Cmd::Node(NodeCmd::List) => {
            let ns = mgr.list_nodes(v1::ListNodesRequest {}).await?.into_inner().nodes;
            show_nodes(json, &ns);
        }
        Cmd::Node(NodeCmd::Drain { id, wait }) => {
            set_node_state(&mut mgr, json, id, v1::NodeState::Draining).await?;
            if wait {
                wait_drained(&mut mgr, json, id).await?;
            }
        }
        Cmd::Node(NodeCmd::Undrain { id }) => {
            set_node_state(&mut mgr, json, id, v1::NodeState::Up).await?
        }
        Cmd::Node(NodeCmd::Remove { id }) => {
            set_node_state(&mut mgr, json, id, v1::NodeState::Removed).await?
        }
        Cmd::Volume(VolumeCmd::Attach { name, host, takeover }) => {
            let req = v1::AttachRequest { volume: by_name(&name), host, takeover };
            let a = mgr.attach(req).await?.into_inner();
            show_attachments(json, std::slice::from_ref(&a));
        }
        Cmd::Volume(VolumeCmd::Detach { name, host }) => {
            mgr.detach(v1::DetachRequest { volume: by_name(&name), host: host.clone() }).await?;
            if json {
                println!("{}", serde_json::json!({ "detached": name, "host": host }));
            } else {
                println!("detached volume {name} from {host}");
            }
        }
        Cmd::Volume(VolumeCmd::Flatten { name }) => {
            let req = v1::FlattenVolumeRequest { volume: by_name(&name) };
            show_volume(json, &mgr.flatten_volume(req).await?.into_inner());
        }
        Cmd::Volume(VolumeCmd::Attachments) => {
            let atts =
                mgr.list_attachments(v1::ListAttachmentsRequest {}).await?.into_inner().attachments;
            show_attachments(json, &atts);
        }
        Cmd::Volume(VolumeCmd::Create { name, size, read_only, labels, class, tenant, node }) => {
            let storage_class = match class {
                None => v1::StorageClass::Unspecified,
                Some(Class::Local) => v1::StorageClass::Local,
                Some(Class::Replicated) => v1::StorageClass::Replicated,
            };
            let req = v1::CreateVolumeRequest {
                name,
                size_bytes: parse_size(&size).map_err(Fail::usage)?,
                storage_class: storage_class as i32,
                read_only,
                tenant,
                labels: labels.into_iter().collect::<HashMap<_, _>>(),
                home_node: node.unwrap_or(0),
                ..Default::default()
            };
            let v = c.create_volume(req).await?.into_inner();
            show_volume(json, &v);
        }
        Cmd::Volume(VolumeCmd::List) => {
            let vs = c.list_volumes(v1::ListVolumesRequest {}).await?.into_inner().volumes;
            show_volumes(json, &vs);
        }
        Cmd::Volume(VolumeCmd::Get { name }) => {
            let v = c.get_volume(v1::GetVolumeRequest { volume: by_name(&name) }).await?;
            show_volume(json, &v.into_inner());
        }
        Cmd::Volume(VolumeCmd::Resize { name, size, allow_shrink }) => {
            let req = v1::ResizeVolumeRequest {
                volume: by_name(&name),
                size_bytes: parse_size(&size).map_err(Fail::usage)?,
                allow_shrink,
            };
            show_volume(json, &c.resize_volume(req).await?.into_inner());
        }
        Cmd::Volume(VolumeCmd::Set { name, read_only }) => {
            if read_only.is_none() {
                return Err(Fail::usage("nothing to set: give --read-only true|false"));
            }
            let req =
                v1::UpdateVolumeRequest { volume: by_name(&name), read_only, clear_parent: false };
            show_volume(json, &c.update_volume(req).await?.into_inner());
        }
        Cmd::Volume(VolumeCmd::Delete { name }) => {
            c.delete_volume(v1::DeleteVolumeRequest { volume: by_name(&name) }).await?;
            if json {
                println!("{}", serde_json::json!({ "deleted": name }));
            } else {
                println!("deleted volume {name}");
            }
        }
        Cmd::Snapshot(cmd) => snapshot_command(&mut mgr, json, cmd).await?,
        Cmd::Node(NodeCmd::Replace { old, with, no_wait }) => {
            let mut cl = ClusterClient::new(channel);
            let new = parse_node_spec(&with).map_err(Fail::usage)?;
            let mut r = cl
                .replace_node(v1::ReplaceNodeRequest { old, new: Some(new), groups: Vec::new() })
                .await?
                .into_inner();
            while !no_wait && !r.finished {
                if !json {
                    print_replacement(false, &r);
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                r = cl.get_replacement(v1::GetReplacementRequest {}).await?.into_inner();
            }
            print_replacement(json, &r);
        }
        Cmd::Node(NodeCmd::Replacement) => {
            let mut cl = ClusterClient::new(channel);
            let r = cl.get_replacement(v1::GetReplacementRequest {}).await?.into_inner();
            print_replacement(json, &r);
        }
        Cmd::Node(NodeCmd::Status) => {
            let s = c.node_status(v1::NodeStatusRequest {}).await?.into_inner();
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "node_id": s.node_id, "version": s.version, "datacenter": s.datacenter,
                        "io_engine": s.io_engine, "direct_io": s.direct_io, "volumes": s.volumes,
                        "allocated_bytes": s.allocated_bytes, "checksum_errors": s.checksum_errors,
                        "repairs": s.repairs, "scrubbed_bytes": s.scrubbed_bytes,
                    })
                );
            } else {
                print_table(
                    &[
                        "NODE",
                        "DC",
                        "ENGINE",
                        "DIRECT_IO",
                        "VOLUMES",
                        "ALLOCATED",
                        "CSUM_ERRORS",
                        "REPAIRS",
                        "SCRUBBED",
                    ],
                    &[vec![
                        s.node_id.to_string(),
                        s.datacenter,
                        s.io_engine,
                        s.direct_io.to_string(),
                        s.volumes.to_string(),
                        format_size(s.allocated_bytes),
                        s.checksum_errors.to_string(),
                        s.repairs.to_string(),
                        format_size(s.scrubbed_bytes),
                    ]],
                );
            }
        }
    }
    Ok(())
}

async fn snapshot_command(
    mgr: &mut ManagerClient<Channel>,
    json: bool,
    cmd: SnapshotCmd,
) -> Result<(), Fail> {
    match cmd {
        SnapshotCmd::Create { volume, name } => {
            let req = v1::CreateSnapshotRequest {
                volume: by_name(&volume),
                name: name.unwrap_or_default(),
            };
            let s = mgr.create_snapshot(req).await?.into_inner();
            show_snapshots(json, std::slice::from_ref(&s), false);
        }
        SnapshotCmd::Get { volume, name } => {
            let req = v1::GetSnapshotRequest { volume: by_name(&volume), name };
            let s = mgr.get_snapshot(req).await?.into_inner();
            show_snapshots(json, std::slice::from_ref(&s), false);
        }
        SnapshotCmd::List { volume, usage } => {
            let req = v1::ListSnapshotsRequest { volume: by_name(&volume), with_usage: usage };
            let r = mgr.list_snapshots(req).await?.into_inner();
            if json && usage {
                let arr: Vec<_> = r.snapshots.iter().map(snapshot_json).collect();
                println!(
                    "{}",
                    serde_json::json!({
                        "snapshots": arr,
                        "total_bytes": r.total_bytes,
                        "head_only_bytes": r.head_only_bytes,
                    })
                );
            } else {
                show_snapshots(json, &r.snapshots, usage);
                if usage && !json {
                    println!(
                        "all versions: {}, only the volume's head: {}",
                        format_size(r.total_bytes),
                        format_size(r.head_only_bytes)
                    );
                }
            }
        }
        SnapshotCmd::Delete { volume, name, wait } => {
            let req =
                v1::DeleteSnapshotRequest { volume: by_name(&volume), name: name.clone(), wait };
            mgr.delete_snapshot(req).await?;
            if json {
                println!("{}", serde_json::json!({ "deleted": name, "volume": volume }));
            } else {
                println!("deleted snapshot {name} of volume {volume}");
            }
        }
        SnapshotCmd::Clone { volume, name, new } => {
            let req =
                v1::CloneVolumeRequest { volume: by_name(&volume), snapshot: name, name: new };
            let v = mgr.clone_volume(req).await?.into_inner();
            show_volume(json, &v);
        }
        SnapshotCmd::Rollback { volume, name } => {
            let req = v1::RollbackSnapshotRequest { volume: by_name(&volume), name: name.clone() };
            mgr.rollback_snapshot(req).await?;
            if json {
                println!("{}", serde_json::json!({ "rolled_back": volume, "snapshot": name }));
            } else {
                println!("rolled volume {volume} back to snapshot {name}");
            }
        }
        SnapshotCmd::Diff { volume, from, to } => {
            let req = v1::DiffSnapshotsRequest { volume: by_name(&volume), from, to };
            let extents = mgr.diff_snapshots(req).await?.into_inner().extents;
            if json {
                let arr: Vec<_> = extents
                    .iter()
                    .map(|e| {
                        serde_json::json!({"offset": e.offset, "length": e.length, "zero": e.zero})
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(arr));
            } else {
                let rows: Vec<Vec<String>> = extents
                    .iter()
                    .map(|e| {
                        vec![
                            e.offset.to_string(),
                            e.length.to_string(),
                            if e.zero { "zero" } else { "data" }.to_string(),
                        ]
                    })
                    .collect();
                print_table(&["OFFSET", "LENGTH", "CONTENT"], &rows);
                let total: u64 = extents.iter().map(|e| e.length).sum();
                println!("changed: {} in {} ranges", format_size(total), extents.len());
            }
        }
    }
    Ok(())
}

fn snapshot_state(s: i32) -> &'static str {
    match v1::SnapshotState::try_from(s) {
        Ok(v1::SnapshotState::Creating) => "creating",
        Ok(v1::SnapshotState::Ready) => "ready",
        Ok(v1::SnapshotState::Deleting) => "deleting",
        _ => "unspecified",
    }
}

fn snapshot_json(s: &v1::Snapshot) -> serde_json::Value {
    serde_json::json!({
        "volume": s.volume,
        "volume_id": s.volume_id,
        "name": s.name,
        "epoch": s.epoch,
        "created_at": s.created_at,
        "size_bytes": s.size_bytes,
        "state": snapshot_state(s.state),
        "exclusive_bytes": s.exclusive_bytes,
    })
}

fn show_snapshots(json: bool, ss: &[v1::Snapshot], usage: bool) {
    if json {
        let arr: Vec<_> = ss.iter().map(snapshot_json).collect();
        println!("{}", serde_json::Value::Array(arr));
        return;
    }
    let mut header = vec!["VOLUME", "NAME", "EPOCH", "SIZE", "STATE", "CREATED"];
    if usage {
        header.push("EXCLUSIVE");
    }
    let rows: Vec<Vec<String>> = ss
        .iter()
        .map(|s| {
            let mut r = vec![
                s.volume.clone(),
                s.name.clone(),
                s.epoch.to_string(),
                format_size(s.size_bytes),
                snapshot_state(s.state).to_string(),
                s.created_at.to_string(),
            ];
            if usage {
                r.push(format_size(s.exclusive_bytes));
            }
            r
        })
        .collect();
    print_table(&header, &rows);
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tern: cannot start runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("tern: {}", f.msg);
            ExitCode::from(f.code)
        }
    }
}
