//! `kill -9` durability: every write acknowledged with FUA, or covered by an acknowledged
//! flush (on any connection: multi-conn), survives `kill -9` of the storage node and of the
//! frontend and a restart. Writes acknowledged without a flush must read back as either their
//! acknowledged content or the one write that was in flight: never garbage, never an error.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use tern_tests::{text, Deployment};

/// Shared by the writer and the checker: arguments and the block pattern (block number and
/// round, repeated).
const PRELUDE: &str = r#"
import json, struct, sys
import nbd

uri, log_path = sys.argv[1], sys.argv[2]
BS = 4096
def block(b, rnd):
    return struct.pack("<QQ", b, rnd) * (BS // 16)
"#;

const WRITER: &str = r#"

a = nbd.NBD(); a.connect_uri(uri)
b = nbd.NBD(); b.connect_uri(uri)
assert a.can_multi_conn()
durable = {}
# Region A (blocks 0..255): round 1 with FUA on connection a; round 2 on connection b without
# FUA, made durable by a flush on connection a.
for i in range(256):
    a.pwrite(block(i, 1), i * BS, nbd.CMD_FLAG_FUA)
    durable[i] = 1
for i in range(0, 256, 2):
    b.pwrite(block(i, 2), i * BS)
a.flush()
for i in range(0, 256, 2):
    durable[i] = 2
# A multi-block write spanning a chunk boundary, FUA.
big = b"".join(block(1000 + k, 7) for k in range(64))
a.pwrite(big, 1000 * BS, nbd.CMD_FLAG_FUA)
for k in range(64):
    durable[1000 + k] = 7
json.dump(durable, open(log_path + ".durable", "w"))
print("DURABLE", flush=True)
# Region B (blocks 4096..8191): unflushed writes until the node dies. Log each write before
# it is issued ("I") and after it is acknowledged ("A").
log = open(log_path, "w", buffering=1)
rnd = 100
try:
    while True:
        for i in range(4096, 8192, 7):
            log.write("I %d %d\n" % (i, rnd))
            a.pwrite(block(i, rnd), i * BS)
            log.write("A %d %d\n" % (i, rnd))
        rnd += 1
except nbd.Error as e:
    print("writer stopped:", e.string, flush=True)
"#;

const CHECKER: &str = r#"
h = nbd.NBD(); h.connect_uri(uri)
durable = json.load(open(log_path + ".durable"))
for k, rnd in durable.items():
    i = int(k)
    got = h.pread(BS, i * BS)
    assert got == block(i, rnd), "block %d: flushed round %d lost (got %r)" % (i, rnd, got[:16])
acked, inflight = {}, {}
for line in open(log_path):
    parts = line.split()
    if len(parts) != 3:
        continue
    kind, i, rnd = parts[0], int(parts[1]), int(parts[2])
    if kind == "I":
        inflight[i] = rnd
    else:
        acked[i] = rnd
        inflight.pop(i, None)
for i, rnd in acked.items():
    got = h.pread(BS, i * BS)
    ok = [block(i, rnd)] + ([block(i, inflight[i])] if i in inflight else [])
    assert got in ok, "block %d: acknowledged round %d lost (got %r)" % (i, rnd, got[:16])
print("checked %d flushed and %d acknowledged blocks" % (len(durable), len(acked)))
"#;

fn kill9_round(engine: &str) {
    let mut d = Deployment::start_with_engine(engine);
    d.create_volume("dur", "128M");
    let uri = d.uri("dur");
    let log = d.dir.path().join("writes.log");
    let script = d.dir.path().join("writer.py");
    std::fs::write(&script, format!("{PRELUDE}{WRITER}")).unwrap();
    let mut w = Command::new("/usr/bin/python3")
        .arg(&script)
        .arg(&uri)
        .arg(&log)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(w.stdout.take().unwrap()).lines();
    let first = lines.next().expect("writer output").unwrap();
    assert_eq!(first, "DURABLE", "writer failed before the durable phase\n{}", d.logs());
    // Let unflushed writes run, then kill both daemons without warning.
    std::thread::sleep(Duration::from_millis(1500));
    d.kill9_node();
    d.kill9_frontend();
    let _ = w.wait();
    let acked =
        std::fs::read_to_string(&log).unwrap().lines().filter(|l| l.starts_with('A')).count();
    assert!(
        acked > 100,
        "too few unflushed writes before the kill ({acked}) for a meaningful test"
    );
    d.start_node();
    d.start_frontend();
    let checker = format!("{PRELUDE}{CHECKER}");
    let out = d.python(120, &checker, &[&uri, log.to_str().unwrap()]);
    assert!(out.status.success(), "data lost after kill -9\n{}\n{}", text(&out), d.logs());
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    // The checker can fail: lose one flushed block on purpose and it must notice.
    d.must_run(60, "qemu-io", &["-f", "raw", &uri, "-c", "write -z 4096 4096"]);
    let out = d.python(120, &checker, &[&uri, log.to_str().unwrap()]);
    assert!(
        !out.status.success() && text(&out).contains("flushed round"),
        "the checker missed a lost block\n{}",
        text(&out)
    );
}

#[test]
fn kill9_loses_no_acknowledged_write_uring() {
    kill9_round("uring");
}

#[test]
fn kill9_loses_no_acknowledged_write_sync_engine() {
    kill9_round("sync");
}

/// The frontend outlives a storage node crash: requests fail with EIO while the node is down
/// (never hang, never wrong data), and work again once it is back, on the same frontend.
#[test]
fn frontend_reconnects_after_storage_node_restart() {
    let mut d = Deployment::start();
    d.create_volume("re", "16M");
    let uri = d.uri("re");
    d.must_run(60, "qemu-io", &["-f", "raw", &uri, "-c", "write -P 0x3c 0 1M", "-c", "flush"]);
    d.kill9_node();
    let o = tern_tests::run(60, "qemu-io", &["-f", "raw", &uri, "-c", "read -P 0x3c 0 4k"]);
    let all = text(&o);
    assert!(
        !o.status.success() || all.contains("error") || all.contains("failed"),
        "a read with the storage node down must fail\n{all}"
    );
    d.start_node();
    d.must_run(60, "qemu-io", &["-f", "raw", &uri, "-c", "read -P 0x3c 0 1M"]);
    d.must_be_alive();
}
