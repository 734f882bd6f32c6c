//! Data lanes (`tern_proto::lane`) against a real storage node: a lane client reads what an NBD
//! client wrote, and bad lane input (wrong magic, unknown version, oversized or undecodable
//! frames, silence) closes only that connection: the node keeps serving NBD and other lanes.

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tern_proto::lane;
use tern_proto::v1::{self, io_request::Op, io_response::Result as Reply};
use tern_tests::Deployment;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn hello(version: u32) -> v1::LaneHello {
    v1::LaneHello { version, datacenter: String::new() }
}

/// Opens a lane that passed its handshake.
async fn open(d: &Deployment) -> TcpStream {
    let mut s = TcpStream::connect(d.node_addr).await.unwrap();
    let w = lane::client_handshake(&mut s, &hello(lane::VERSION)).await.unwrap();
    assert_eq!(w.version, lane::VERSION);
    s
}

/// Sends `reqs` in one write and returns the responses, by id order.
async fn exchange(s: &mut TcpStream, reqs: &[v1::IoRequest]) -> Vec<v1::IoResponse> {
    let mut out = BytesMut::new();
    for r in reqs {
        lane::put_frame(r, &mut out);
    }
    s.write_all(&out).await.unwrap();
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    while got.len() < reqs.len() {
        while let Some(f) = lane::take_frame(&mut buf).unwrap() {
            got.push(lane::decode::<v1::IoResponse>(f).unwrap());
        }
        if got.len() < reqs.len() {
            let n = tokio::time::timeout(Duration::from_secs(10), s.read_buf(&mut buf))
                .await
                .expect("the node answers within 10 s")
                .unwrap();
            assert!(n > 0, "the node closed a good lane");
        }
    }
    got.sort_by_key(|r| r.id);
    got
}

/// Whether the node closed `s` (within 10 s), reading and discarding whatever it sent first.
async fn closed(s: &mut TcpStream) -> bool {
    let mut sink = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut sink)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

fn read(id: u64, volume_id: u64, offset: u64, length: u32) -> v1::IoRequest {
    let header = Some(v1::IoHeader { volume_id, epoch: 0, generation: 0 });
    v1::IoRequest { id, op: Some(Op::Read(v1::ReadRequest { header, offset, length })) }
}

#[test]
fn lanes_serve_reads_and_bad_input_closes_only_its_own_lane() {
    let mut d = Deployment::start();
    d.create_volume("vol", "16M");
    let uri = d.uri("vol");
    d.must_run(30, "qemu-io", &["-f", "raw", &uri, "-c", "write -P 0x5a 1M 64k"]);

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut admin = v1::volume_admin_client::VolumeAdminClient::connect(format!(
            "http://{}",
            d.node_addr
        ))
        .await
        .unwrap();
        let vols = admin.list_volumes(v1::ListVolumesRequest {}).await.unwrap().into_inner();
        let vol = vols.volumes.iter().find(|v| v.name == "vol").expect("vol is listed").id;

        // A good lane: reads (pipelined, answered by id), a ping, a request without an
        // operation (an error answer, the lane stays open).
        let mut good = open(&d).await;
        let ping = v1::IoRequest { id: 3, op: Some(Op::Ping(v1::Ping {})) };
        let none = v1::IoRequest { id: 4, op: None };
        let r = exchange(
            &mut good,
            &[read(1, vol, 1 << 20, 65536), read(2, vol, 0, 4096), ping, none],
        )
        .await;
        assert!(matches!(&r[0].result, Some(Reply::Read(x)) if x.data.iter().all(|&b| b == 0x5a) && x.data.len() == 65536), "{:?}", r[0].result.as_ref().map(|_| ()));
        assert!(matches!(&r[1].result, Some(Reply::Read(x)) if x.data.iter().all(|&b| b == 0) && x.data.len() == 4096));
        assert_eq!(r[2].result, Some(Reply::Pong(true)));
        assert!(matches!(&r[3].result, Some(Reply::Error(e)) if e.message.contains("without an operation")), "{:?}", r[3]);
        // A read of a volume that does not exist is an error answer, not a closed lane.
        let r = exchange(&mut good, &[read(5, 999_999, 0, 4096)]).await;
        assert!(matches!(&r[0].result, Some(Reply::Error(_))), "{:?}", r[0]);

        // An unknown version is refused with a reason.
        let mut s = TcpStream::connect(d.node_addr).await.unwrap();
        let e = lane::client_handshake(&mut s, &hello(99)).await.unwrap_err();
        assert!(e.to_string().contains("version 99"), "{e}");
        assert!(closed(&mut s).await);

        // A wrong magic (first byte right, so it is taken for a lane) is closed.
        let mut s = TcpStream::connect(d.node_addr).await.unwrap();
        s.write_all(b"TERNLAMP\0\0\0\0").await.unwrap();
        assert!(closed(&mut s).await, "a bad magic was not closed");

        // An oversized frame and an undecodable one each close their lane.
        let mut s = open(&d).await;
        let mut b = BytesMut::new();
        b.put_u32(u32::MAX);
        s.write_all(&b).await.unwrap();
        assert!(closed(&mut s).await, "an oversized frame was not refused");
        let mut s = open(&d).await;
        let mut b = BytesMut::new();
        b.put_u32(5);
        b.put_slice(&[0xff; 5]);
        s.write_all(&b).await.unwrap();
        assert!(closed(&mut s).await, "an undecodable frame was not refused");

        // A connection that never says anything is closed after the handshake timeout (not
        // waited for here: it must just not hold up anyone else).
        let _silent = TcpStream::connect(d.node_addr).await.unwrap();

        // The good lane is still served, with the data intact.
        let r = exchange(&mut good, &[read(6, vol, 1 << 20, 4096)]).await;
        assert!(matches!(&r[0].result, Some(Reply::Read(x)) if x.data.iter().all(|&b| b == 0x5a)));
    });
    // And NBD clients still are.
    d.must_run(30, "qemu-io", &["-f", "raw", &uri, "-c", "read -P 0x5a 1M 64k"]);
    d.must_be_alive();
}

/// Nodes keep serving the `BlockIo.Io` gRPC stream (frontends from before lanes) and the
/// unary calls, with the same answers as a lane gives.
#[test]
fn the_grpc_io_stream_and_unary_calls_still_serve() {
    let mut d = Deployment::start();
    d.create_volume("vol", "16M");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let uri = format!("http://{}", d.node_addr);
        let mut admin =
            v1::volume_admin_client::VolumeAdminClient::connect(uri.clone()).await.unwrap();
        let vols = admin.list_volumes(v1::ListVolumesRequest {}).await.unwrap().into_inner();
        let vol = vols.volumes.iter().find(|v| v.name == "vol").expect("vol is listed").id;
        let header = Some(v1::IoHeader { volume_id: vol, epoch: 0, generation: 0 });
        let mut io = v1::block_io_client::BlockIoClient::connect(uri).await.unwrap();

        let write = v1::IoRequest {
            id: 1,
            op: Some(Op::Write(v1::WriteRequest {
                header,
                offset: 8192,
                data: vec![0xc3; 8192].into(),
                fua: true,
            })),
        };
        let ping = v1::IoRequest { id: 2, op: Some(Op::Ping(v1::Ping {})) };
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(write).await.unwrap();
        tx.send(ping).await.unwrap();
        let mut answers = io
            .io(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let mut got = Vec::new();
        for _ in 0..2 {
            got.push(answers.message().await.unwrap().expect("an answer per request"));
        }
        got.sort_by_key(|r| r.id);
        assert_eq!(got[0].result, Some(Reply::Done(true)), "{:?}", got[0]);
        assert_eq!(got[1].result, Some(Reply::Pong(true)));
        // A read on the same stream sees the write; so does a unary read.
        tx.send(read(3, vol, 8192, 8192)).await.unwrap();
        let r = answers.message().await.unwrap().unwrap();
        assert!(matches!(&r.result, Some(Reply::Read(x)) if x.data.iter().all(|&b| b == 0xc3) && x.data.len() == 8192));
        let unary = io
            .read(v1::ReadRequest { header, offset: 8192, length: 4096 })
            .await
            .unwrap()
            .into_inner();
        assert!(unary.data.iter().all(|&b| b == 0xc3) && unary.data.len() == 4096);
    });
    d.must_be_alive();
}
