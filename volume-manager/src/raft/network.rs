//! Raft messages between manager replicas: `ManagerRaft.Call`, bincode payloads.

use std::collections::HashMap;
use std::sync::Arc;

use openraft::error::{
    Fatal, NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed, StreamingError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::storage::Snapshot;
use parking_lot::Mutex;
use tern_proto::v1::{self, manager_raft_client::ManagerRaftClient};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::{decode, encode, Member, Raft, TypeConfig};

const APPEND: u32 = 1;
const VOTE: u32 = 2;
const SNAPSHOT: u32 = 3;

#[derive(Debug, thiserror::Error)]
#[error("manager {0}: {1}")]
struct CallError(u64, String);

/// One lazily connected channel per peer address, shared by all clients.
#[derive(Clone, Default)]
pub struct Network {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl Network {
    /// The channel to `address` (created on first use, connected lazily).
    pub fn channel(&self, address: &str) -> Result<Channel, String> {
        let mut m = self.channels.lock();
        if let Some(c) = m.get(address) {
            return Ok(c.clone());
        }
        let c = Channel::from_shared(format!("http://{address}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(std::time::Duration::from_millis(500))
            .connect_lazy();
        m.insert(address.to_string(), c.clone());
        Ok(c)
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: u64, node: &Member) -> Self::Network {
        Peer { target, channel: self.channel(&node.address) }
    }
}

pub struct Peer {
    target: u64,
    channel: Result<Channel, String>,
}

type RpcErr = RPCError<u64, Member, RaftError<u64>>;

impl Peer {
    async fn call(
        &self,
        kind: u32,
        payload: Vec<u8>,
        option: &RPCOption,
    ) -> Result<Vec<u8>, CallError> {
        let channel = self.channel.clone().map_err(|e| CallError(self.target, e))?;
        let mut client = ManagerRaftClient::new(channel);
        let mut req = Request::new(v1::ManagerRaftRequest { kind, payload: payload.into() });
        req.set_timeout(option.hard_ttl());
        let reply = client
            .call(req)
            .await
            .map_err(|s| CallError(self.target, s.message().to_string()))?
            .into_inner();
        if !reply.error.is_empty() {
            return Err(CallError(self.target, reply.error));
        }
        Ok(reply.payload.to_vec())
    }

    async fn rpc<Req: serde::Serialize, Resp: serde::de::DeserializeOwned>(
        &self,
        kind: u32,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RpcErr> {
        let bytes = self
            .call(kind, encode(req), option)
            .await
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        let r: Result<Resp, RaftError<u64>> = decode(&bytes).map_err(|e| {
            RPCError::Network(NetworkError::new(&CallError(self.target, e.to_string())))
        })?;
        r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RpcErr> {
        self.rpc(APPEND, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RpcErr> {
        self.rpc(VOTE, &rpc, &option).await
    }

    /// The whole state in one message: it is small.
    async fn full_snapshot(
        &mut self,
        vote: openraft::Vote<u64>,
        snapshot: Snapshot<TypeConfig>,
        cancel: impl std::future::Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<u64>, StreamingError<TypeConfig, Fatal<u64>>> {
        let payload = encode(&(vote, snapshot.meta, snapshot.snapshot.into_inner()));
        let bytes = tokio::select! {
            r = self.call(SNAPSHOT, payload, &option) => {
                r.map_err(|e| StreamingError::Unreachable(Unreachable::new(&e)))?
            }
            closed = cancel => return Err(StreamingError::Closed(closed)),
        };
        let r: Result<SnapshotResponse<u64>, Fatal<u64>> = decode(&bytes).map_err(|e| {
            StreamingError::Unreachable(Unreachable::new(&CallError(self.target, e.to_string())))
        })?;
        r.map_err(|f| StreamingError::RemoteError(RemoteError::new(self.target, f)))
    }
}

/// The receiving side.
pub struct RaftService {
    pub raft: Raft,
}

#[tonic::async_trait]
impl v1::manager_raft_server::ManagerRaft for RaftService {
    async fn call(
        &self,
        req: Request<v1::ManagerRaftRequest>,
    ) -> Result<Response<v1::ManagerRaftReply>, Status> {
        let req = req.into_inner();
        let fail = |e: String| {
            Ok(Response::new(v1::ManagerRaftReply { payload: Default::default(), error: e }))
        };
        let payload = match req.kind {
            APPEND => match decode::<AppendEntriesRequest<TypeConfig>>(&req.payload) {
                Ok(r) => encode(&self.raft.append_entries(r).await),
                Err(e) => return fail(format!("bad append-entries payload: {e}")),
            },
            VOTE => match decode::<VoteRequest<u64>>(&req.payload) {
                Ok(r) => encode(&self.raft.vote(r).await),
                Err(e) => return fail(format!("bad vote payload: {e}")),
            },
            SNAPSHOT => {
                type Full = (openraft::Vote<u64>, openraft::SnapshotMeta<u64, Member>, Vec<u8>);
                match decode::<Full>(&req.payload) {
                    Ok((vote, meta, data)) => {
                        let snapshot =
                            Snapshot { meta, snapshot: Box::new(std::io::Cursor::new(data)) };
                        encode(&self.raft.install_full_snapshot(vote, snapshot).await)
                    }
                    Err(e) => return fail(format!("bad snapshot payload: {e}")),
                }
            }
            k => return fail(format!("unknown message kind {k}")),
        };
        Ok(Response::new(v1::ManagerRaftReply { payload: payload.into(), error: String::new() }))
    }
}
