//! Real NBD clients against a real storage node and frontend: qemu-io, qemu-img, nbdinfo,
//! nbdcopy, fio, libnbd scripts, and an ext4 filesystem through nbdfuse and a loop device.

use tern_tests::{random_bytes, require_tool, run, text, Deployment};

#[test]
fn qemu_io_patterns_zeroes_and_discard() {
    let d = Deployment::start();
    d.create_volume("vol", "64M");
    let uri = d.uri("vol");
    let out = d.must_run(
        60,
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "write -P 0x11 1M 4k",
            "-c",
            "write -P 0x22 1052672 512",
            "-c",
            "read -P 0x11 1M 4k",
            "-c",
            "write -z 2M 1M",
            "-c",
            "read -P 0 2M 1M",
            "-c",
            "write -P 0xcd 3M 1M",
            "-c",
            "discard 3M 1M",
            "-c",
            "read -P 0 3M 1M",
            "-c",
            "flush",
            "-c",
            "read -P 0xab 0 1M",
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // The test can fail: a wrong pattern is caught.
    let o = run(60, "qemu-io", &["-f", "raw", &uri, "-c", "read -P 0xcd 0 4k"]);
    let all = text(&o);
    assert!(
        !o.status.success() || all.contains("Pattern verification failed"),
        "qemu-io did not notice a wrong pattern\n{all}"
    );
    let mut d = d;
    d.must_be_alive();
}

#[test]
fn qemu_img_convert_and_compare_round_trip() {
    let d = Deployment::start();
    d.create_volume("img", "32M");
    let src = d.dir.path().join("src.raw");
    let mut data = random_bytes(32 << 20, 7);
    data[4 << 20..12 << 20].fill(0); // a zero run, written as zeroes
    std::fs::write(&src, &data).unwrap();
    let uri = d.uri("img");
    let src_s = src.to_str().unwrap();
    d.must_run(120, "qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", src_s, &uri]);
    let out = d.must_run(120, "qemu-img", &["compare", "-f", "raw", "-F", "raw", src_s, &uri]);
    assert!(out.contains("Images are identical"), "{out}");
    // Back out to a file, byte for byte.
    let back = d.dir.path().join("back.raw");
    d.must_run(
        120,
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &uri, back.to_str().unwrap()],
    );
    assert!(std::fs::read(&back).unwrap() == data, "converted image differs");
    // The comparison can fail: change one byte of the source.
    data[(20 << 20) + 5] ^= 0x5a;
    std::fs::write(&src, &data).unwrap();
    let o = run(120, "qemu-img", &["compare", "-f", "raw", "-F", "raw", src_s, &uri]);
    assert_eq!(o.status.code(), Some(1), "compare must report a difference\n{}", text(&o));
}

#[test]
fn nbdinfo_plain_list_and_map_shows_trimmed_hole() {
    let d = Deployment::start();
    d.create_volume("alpha", "16M");
    d.create_volume("beta", "8M");
    let out = d.must_run(30, "nbdinfo", &[&d.uri("alpha")]);
    assert!(out.contains("export-size: 16777216"), "{out}");
    assert!(out.contains("can_flush: true") && out.contains("can_fua: true"), "{out}");
    assert!(out.contains("can_trim: true") && out.contains("can_zero: true"), "{out}");
    assert!(out.contains("can_multi_conn: true"), "{out}");
    assert!(out.contains("block_size_preferred: 4096"), "{out}");
    let list = d.must_run(30, "nbdinfo", &["--list", &format!("nbd://{}", d.nbd_addr)]);
    assert!(list.contains("alpha") && list.contains("beta"), "{list}");

    // Fill 4 MiB, trim the middle 1 MiB: the map shows data, hole, data.
    d.must_run(
        60,
        "qemu-io",
        &["-f", "raw", &d.uri("alpha"), "-c", "write -P 0x5a 0 4M", "-c", "discard 1M 1M"],
    );
    let map = d.must_run(30, "nbdinfo", &["--map", "--json", &d.uri("alpha")]);
    let v: serde_json::Value = serde_json::from_str(&map).unwrap_or_else(|e| panic!("{e}: {map}"));
    let extents: Vec<(u64, u64, u64)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect();
    let mib = 1u64 << 20;
    assert_eq!(extents[0], (0, mib, 0), "data first: {extents:?}");
    assert_eq!(extents[1], (mib, mib, 3), "trimmed range is a hole reading zeros: {extents:?}");
    assert_eq!(extents[2], (2 * mib, 2 * mib, 0), "{extents:?}");
    assert_eq!(extents[3], (4 * mib, 12 * mib, 3), "never written: hole: {extents:?}");
}

#[test]
fn nbdcopy_round_trip() {
    let d = Deployment::start();
    d.create_volume("copy", "24M");
    let src = d.dir.path().join("src.raw");
    let data = random_bytes(24 << 20, 11);
    std::fs::write(&src, &data).unwrap();
    let out = d.dir.path().join("out.raw");
    d.must_run(120, "nbdcopy", &[src.to_str().unwrap(), &d.uri("copy")]);
    d.must_run(120, "nbdcopy", &[&d.uri("copy"), out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == data, "nbdcopy round trip differs");
}

#[test]
fn fio_nbd_engine_verifies_crc32c() {
    let d = Deployment::start();
    d.create_volume("fio", "64M");
    let uri = format!("--uri={}", d.uri("fio"));
    for rw in ["randwrite", "write"] {
        let out = d.must_run(
            300,
            "fio",
            &[
                "--name=verify",
                "--ioengine=nbd",
                &uri,
                &format!("--rw={rw}"),
                "--bs=4k",
                "--iodepth=16",
                "--size=64M",
                "--verify=crc32c",
                "--verify_fatal=1",
                "--do_verify=1",
                "--verify_state_save=0",
                "--output-format=json",
            ],
        );
        let v: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
        let job = &v["jobs"][0];
        assert_eq!(job["error"].as_i64(), Some(0), "{out}");
        assert!(
            job["read"]["io_bytes"].as_u64().unwrap() >= 64 << 20,
            "fio verified nothing: {out}"
        );
    }
}

/// Error cases a polite client never provokes, through libnbd with strict mode off.
const ERRORS_SCRIPT: &str = r#"
import errno, socket, struct, sys
import nbd

host, port = sys.argv[1], int(sys.argv[2])
uri = "nbd://%s:%d/" % (host, port)

def expect_errno(what, fn, want):
    try:
        fn()
    except nbd.Error as e:
        # libnbd gives the errno as a name ("EINVAL") or a number, depending on the version.
        got = e.errno if isinstance(e.errno, int) else getattr(errno, str(e.errno), None)
        assert got == want, "%s: errno %s, want %s (%s)" % (what, e.errno, want, e.string)
        print("ok:", what, errno.errorcode[want])
        return
    raise AssertionError("%s: no error" % what)

h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(uri + "rw")
size = h.get_size()
h.pwrite(b"\xaa" * 4096, 0)
# Out of range requests: EINVAL, except writes past the end, for which the spec prescribes
# ENOSPC.
expect_errno("read past end", lambda: h.pread(4096, size - 2048), errno.EINVAL)
expect_errno("write past end", lambda: h.pwrite(b"x" * 4096, size), errno.ENOSPC)
expect_errno("trim past end", lambda: h.trim(8192, size - 4096), errno.EINVAL)
expect_errno("zero past end", lambda: h.zero(8192, size - 4096), errno.ENOSPC)
# Misaligned to the advertised 512-byte minimum block size: EINVAL.
expect_errno("misaligned read", lambda: h.pread(100, 3), errno.EINVAL)
expect_errno("misaligned write", lambda: h.pwrite(b"y" * 100, 512), errno.EINVAL)
# The connection still works, and no data was harmed.
assert h.pread(4096, 0) == b"\xaa" * 4096
h.shutdown()

# Writes to a read-only export: EPERM, nothing changes.
r = nbd.NBD()
r.set_strict_mode(0)
r.connect_uri(uri + "ro")
assert r.is_read_only()
before = r.pread(4096, 0)
expect_errno("write to read-only", lambda: r.pwrite(b"z" * 4096, 0), errno.EPERM)
expect_errno("trim on read-only", lambda: r.trim(4096, 0), errno.EPERM)
expect_errno("zero on read-only", lambda: r.zero(4096, 0), errno.EPERM)
assert r.pread(4096, 0) == before
r.shutdown()

# An export that does not exist: the handshake fails cleanly.
u = nbd.NBD()
try:
    u.connect_uri(uri + "no-such-volume")
    raise AssertionError("connected to a missing export")
except nbd.Error as e:
    print("ok: missing export refused:", e.string)

# Broken framing: a bad request magic after a good handshake closes that connection only.
g = nbd.NBD()
g.connect_uri(uri + "rw")
s = socket.create_connection((host, port))
def recvn(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError
        b += c
    return b
hello = recvn(18)
assert hello[:8] == b"NBDMAGIC" and hello[8:16] == b"IHAVEOPT"
s.sendall(struct.pack(">I", 1 | 2))  # FIXED_NEWSTYLE | NO_ZEROES
# An unknown option gets NBD_REP_ERR_UNSUP and negotiation goes on.
s.sendall(b"IHAVEOPT" + struct.pack(">II", 0x7777, 0))
magic, opt, rtype, rlen = struct.unpack(">QIII", recvn(20))
assert (opt, rtype) == (0x7777, (1 << 31) + 1), (opt, hex(rtype))
recvn(rlen)
print("ok: unknown option -> NBD_REP_ERR_UNSUP")
name = b"rw"
s.sendall(b"IHAVEOPT" + struct.pack(">II", 1, len(name)) + name)  # EXPORT_NAME
recvn(8 + 2)
s.sendall(b"\xde\xad\xbe\xef" + b"\0" * 24)
s.settimeout(10)
try:
    rest = s.recv(100)
    assert rest == b"", "server answered a bad magic: %r" % rest
except ConnectionResetError:
    pass
print("ok: bad magic closed the connection")
# The other connection is unharmed.
assert g.pread(4096, 0) == b"\xaa" * 4096
g.flush()
g.shutdown()
print("all error cases ok")
"#;

#[test]
fn nbdsh_error_cases() {
    let d = Deployment::start();
    d.create_volume("rw", "16M");
    d.create_volume("ro", "16M");
    d.must_tern(&["volume", "set", "ro", "--read-only", "true"]);
    let port = d.nbd_addr.port().to_string();
    let out = d.must_python(60, ERRORS_SCRIPT, &["127.0.0.1", &port]);
    assert!(out.contains("all error cases ok"), "{out}");
    let mut d = d;
    d.must_be_alive();
}

#[test]
fn ext4_through_nbdfuse_and_loop_is_clean() {
    for t in ["nbdfuse", "losetup", "mkfs.ext4", "e2fsck", "mount", "umount"] {
        require_tool(t);
    }
    let d = Deployment::start();
    d.create_volume("fs", "256M");
    let mnt = d.dir.path().join("fuse");
    let fsdir = d.dir.path().join("fs");
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::create_dir_all(&fsdir).unwrap();
    let mut fuse = std::process::Command::new("nbdfuse")
        .arg(&mnt)
        .arg(d.uri("fs"))
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("nbdfuse");
    let dev = mnt.join("nbd");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !dev.exists() {
        assert!(std::time::Instant::now() < deadline, "nbdfuse did not expose {}", dev.display());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let sh = |cmd: &str| {
        let o = run(300, "sh", &["-c", cmd]);
        (o.status.success(), text(&o))
    };
    let (ok, out) = sh(&format!("losetup -f --show {}", dev.display()));
    assert!(ok, "{out}");
    let lo =
        out.lines().find(|l| l.starts_with("/dev/loop")).expect("loop device").trim().to_string();
    let cleanup = |lo: &str| {
        let _ = sh(&format!("umount {} 2>/dev/null; losetup -d {lo}", fsdir.display()));
    };
    let steps = [
        format!("mkfs.ext4 -q -F {lo}"),
        format!("mount {lo} {}", fsdir.display()),
        format!(
            "set -e; cd {0}; mkdir d; for i in $(seq 1 50); do head -c $((i * 4096 + 17)) /dev/urandom > d/f$i; done; \
             sha256sum d/* > ../sums; sync",
            fsdir.display()
        ),
        format!("umount {}", fsdir.display()),
        format!("e2fsck -fn {lo}"),
        format!("mount {lo} {}", fsdir.display()),
        format!("cd {} && sha256sum -c --quiet ../sums", fsdir.display()),
        format!("umount {}", fsdir.display()),
    ];
    for step in &steps {
        let (ok, out) = sh(step);
        if !ok {
            cleanup(&lo);
            let _ = fuse.kill();
            panic!("step failed: {step}\n{out}\n{}", d.logs());
        }
    }
    cleanup(&lo);
    let _ = run(30, "umount", &[mnt.to_str().unwrap()]);
    let _ = fuse.wait();
}
