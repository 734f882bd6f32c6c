#!/usr/bin/python3
"""Fault-suite workload and checker: writes and reads blocks of a Tern volume over NBD while
faults hit the cluster, records every operation's invocation and completion times, then
checks the history.

    history.py URI SECONDS OUT_JSON

Writers own disjoint blocks and write increasing versions to them (content: the block number
and the version, repeated, so torn or misplaced data is caught too). Readers read random
blocks. Afterwards, with all writers stopped, every block is read once more. The checks:

  1. no acknowledged write is lost: each block's final version is its last acknowledged one or
     a later one that was issued (in flight, or failed with an unknown outcome);
  2. no stale read: a read returns at least the newest version acknowledged before it started;
  3. no read from the future: a read returns a version issued before it returned;
  4. no I/O errors while faults come and go (the frontend retries across failovers).

Prints READY once the first writes are acknowledged (the test then injects its fault), and a
JSON summary (counts, the longest stretch without any completed write) at the end. Exits 1 with
the first violation found.
"""
import json, random, sys, threading, time
import nbd
from versioned_blocks import BS, content, version_of

uri, seconds, out_path = sys.argv[1], float(sys.argv[2]), sys.argv[3]
WRITERS, READERS = 4, 2
# 256 blocks, 4 MiB apart: every 64 MiB chunk of a 1 GiB volume (so every group) is hit.
BLOCKS = [k * 1024 + (k % 7) for k in range(256)]


now = time.monotonic
writes = {b: [] for b in BLOCKS}   # b -> [(version, t_invoked, t_done or None, ok)]
reads = []                         # (b, t_invoked, t_returned, version)
errors = []
stop = threading.Event()
first_acks = threading.Semaphore(0)

def writer(w):
    h = nbd.NBD(); h.connect_uri(uri)
    mine = [b for i, b in enumerate(BLOCKS) if i % WRITERS == w]
    v = 0
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
            except nbd.Error as e:
                rec[2] = now()
                errors.append("write block %d v%d: %s" % (b, v, e))
        if v == 1:
            first_acks.release()

def reader(r):
    h = nbd.NBD(); h.connect_uri(uri)
    rnd = random.Random(r)
    while not stop.is_set():
        b = rnd.choice(BLOCKS)
        t0 = now()
        try:
            data = h.pread(BS, b * BS)
        except nbd.Error as e:
            errors.append("read block %d: %s" % (b, e))
            continue
        reads.append((b, t0, now(), version_of(b, data)))

threads = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
threads += [threading.Thread(target=reader, args=(r,)) for r in range(READERS)]
for t in threads:
    t.start()
for _ in range(WRITERS):
    first_acks.acquire()
t_ready = now()
print("READY", flush=True)
time.sleep(seconds)
stop.set()
for t in threads:
    t.join()

def fail(msg):
    print("VIOLATION: " + msg, flush=True)
    sys.exit(1)

if errors:
    fail("%d I/O errors, first: %s" % (len(errors), errors[0]))

# 1. Final state.
h = nbd.NBD(); h.connect_uri(uri)
for b in BLOCKS:
    final = version_of(b, h.pread(BS, b * BS))
    acked = [v for (v, _, _, ok) in writes[b] if ok]
    last = max(acked) if acked else 0
    maybe = {last} | {v for (v, _, _, ok) in writes[b] if not ok or v > last}
    if final not in maybe:
        fail("block %d: final version %d, but %d was acknowledged (lost write)" % (b, final, last))

# 2 and 3. Every read against the writes of its block.
for (b, t0, t1, v) in reads:
    newest_before = max([wv for (wv, _, td, ok) in writes[b] if ok and td < t0], default=0)
    if v < newest_before:
        fail("stale read of block %d: got v%d at [%.3f, %.3f], v%d was acknowledged before"
             % (b, v, t0 - t_ready, t1 - t_ready, newest_before))
    if v != 0:
        issued = [ti for (wv, ti, _, _) in writes[b] if wv == v]
        if not issued or issued[0] > t1:
            fail("read of block %d returned v%d before it was written" % (b, v))

acks = sorted(td for ws in writes.values() for (_, _, td, ok) in ws if ok and td >= t_ready)
gaps = [b - a for a, b in zip([t_ready] + acks, acks)]
summary = {
    "writes_acknowledged": sum(1 for ws in writes.values() for w in ws if w[3]),
    "reads": len(reads),
    "max_write_stall_ms": round(1000 * max(gaps, default=seconds), 1),
}
json.dump(summary, open(out_path, "w"))
print(json.dumps(summary), flush=True)
