#!/usr/bin/python3
"""Snapshots under writes: takes snapshots of a Tern volume with `tern snapshot create` while
writers write to it over NBD, then checks every snapshot against what was acknowledged.

    snapshots.py NBD_HOST:PORT VOLUME TERN ENDPOINTS SNAPSHOTS OUT_JSON

Writers own disjoint blocks and write increasing versions to them (content: the block number
and the version, repeated). Each snapshot's call start and return times are recorded. Then
every snapshot is read back through its read-only export `VOLUME@NAME` and checked:

  1. nothing acknowledged before the snapshot was asked for is missing: each block holds at
     least the newest version acknowledged before the call started;
  2. nothing issued after the call returned is in it: each block's version was issued before;
  3. it is crash-consistent: no write it lacks was acknowledged before a write it holds was
     issued (it is the volume as some instant left it);
  4. `tern snapshot diff` between consecutive snapshots names exactly the blocks whose
     versions differ (and from nothing to the first, exactly the blocks written);
  5. the head holds every block's last acknowledged version.

Prints READY once the first writes are acknowledged, and a JSON summary at the end. Exits 1
with the first violation found.
"""
import json, random, subprocess, sys, threading, time
import nbd
from versioned_blocks import BS, content, version_of

hostport, volume, tern, endpoints, count, out_path = sys.argv[1:7]
count = int(count)
WRITERS = 4
# 192 blocks spread over a 512 MiB volume: every chunk (so every chunk group) is hit.
BLOCKS = [k * 683 + (k % 5) for k in range(192)]


now = time.monotonic
writes = {b: [] for b in BLOCKS}   # b -> [(version, t_invoked, t_done or None, ok)]
errors = []
stop = threading.Event()
first_acks = threading.Semaphore(0)

def writer(w):
    h = nbd.NBD(); h.connect_uri("nbd://%s/%s" % (hostport, volume))
    mine = [b for i, b in enumerate(BLOCKS) if i % WRITERS == w]
    v = 0
    announced = False
    while not stop.is_set():
        v += 1
        for b in mine:
            if stop.is_set():
                break
            rec = [v, now(), None, False]
            writes[b].append(rec)
            try:
                h.pwrite(content(b, v), b * BS)
                rec[2], rec[3] = now(), True
            except Exception as e:  # the outcome is unknown: it may or may not have landed
                rec[2] = now()
                errors.append("write of block %d v%d: %s" % (b, v, e))
                return
            if not announced:
                announced = True
                first_acks.release()
    h.shutdown()

threads = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
for t in threads:
    t.start()
for _ in range(WRITERS):
    first_acks.acquire()
print("READY", flush=True)

def run_tern(*args):
    cmd = [tern, "--endpoint", endpoints, "--json"] + list(args)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise AssertionError("%s failed (%d): %s" % (" ".join(cmd), p.returncode, p.stderr))
    return json.loads(p.stdout)

snaps = []   # (name, t_start, t_return, epoch)
try:
    for i in range(count):
        time.sleep(random.uniform(0.2, 0.6))
        name = "s%d" % (i + 1)
        t0 = now()
        s = run_tern("snapshot", "create", volume, name)
        t1 = now()
        assert s[0]["state"] == "ready", s
        snaps.append((name, t0, t1, s[0]["epoch"]))
    time.sleep(0.3)
finally:
    stop.set()
    for t in threads:
        t.join()
if errors:
    print("writes failed: %s" % errors[:3], file=sys.stderr)
    sys.exit(1)

def read_all(export):
    h = nbd.NBD(); h.connect_uri("nbd://%s/%s" % (hostport, export))
    assert h.is_read_only() or export == volume, "snapshot export %s is writable" % export
    got = {b: version_of(b, h.pread(BS, b * BS)) for b in BLOCKS}
    h.shutdown()
    return got

def fail(msg):
    print(msg, file=sys.stderr)
    sys.exit(1)

seen = {}
create_ms = []
for name, t0, t1, epoch in snaps:
    create_ms.append((t1 - t0) * 1000)
    got = read_all("%s@%s" % (volume, name))
    seen[name] = got
    latest_in_issue, earliest_out_ack = 0.0, float("inf")
    for b in BLOCKS:
        v = got[b]
        acked_before = [r[0] for r in writes[b] if r[3] and r[2] < t0]
        if acked_before and v < max(acked_before):
            fail("snapshot %s: block %d holds v%d, but v%d was acknowledged before it was asked for"
                 % (name, b, v, max(acked_before)))
        if v:
            rec = [r for r in writes[b] if r[0] == v]
            if not rec or rec[0][1] >= t1:
                fail("snapshot %s: block %d holds v%d, issued after the snapshot returned" % (name, b, v))
            latest_in_issue = max(latest_in_issue, rec[0][1])
        nxt = [r for r in writes[b] if r[0] == v + 1 and r[3]]
        if nxt:
            earliest_out_ack = min(earliest_out_ack, nxt[0][2])
    if latest_in_issue > earliest_out_ack:
        fail("snapshot %s is not crash-consistent: a write it holds was issued %.1f ms after a "
             "write it lacks was acknowledged" % (name, (latest_in_issue - earliest_out_ack) * 1000))

def diff_blocks(frm, to):
    extents = run_tern("snapshot", "diff", volume, "--from", frm, "--to", to)
    out = set()
    for e in extents:
        for b in BLOCKS:
            if e["offset"] <= b * BS < e["offset"] + e["length"]:
                out.add(b)
    return out

pairs = [("", snaps[0][0])] + [(snaps[i][0], snaps[i + 1][0]) for i in range(len(snaps) - 1)]
diffs_checked = 0
for frm, to in pairs:
    expect = {b for b in BLOCKS if (seen[frm][b] if frm else 0) != seen[to][b]}
    got = diff_blocks(frm, to)
    if got != expect:
        fail("diff %r..%r: expected %d changed blocks, got %d (missing %s, extra %s)"
             % (frm, to, len(expect), len(got), sorted(expect - got)[:5], sorted(got - expect)[:5]))
    diffs_checked += 1

head = read_all(volume)
for b in BLOCKS:
    acked = [r[0] for r in writes[b] if r[3]]
    issued = [r[0] for r in writes[b]]
    if head[b] < max(acked, default=0) or head[b] > max(issued, default=0):
        fail("head: block %d holds v%d (last acknowledged v%d)" % (b, head[b], max(acked, default=0)))

summary = {
    "snapshots": len(snaps),
    "writes": sum(len(w) for w in writes.values()),
    "create_ms_max": round(max(create_ms), 1),
    "create_ms_avg": round(sum(create_ms) / len(create_ms), 1),
    "diffs_checked": diffs_checked,
}
json.dump(summary, open(out_path, "w"))
print(json.dumps(summary), flush=True)
