//! The `tern` CLI against a real storage node: volume lifecycle, tables and JSON, and clear
//! errors with meaningful exit codes for bad input.

use tern_tests::{text, Deployment};

#[test]
fn volume_lifecycle_and_errors() {
    let d = Deployment::start();
    let out = d.must_tern(&["volume", "create", "disk-1", "--size", "1G", "--label", "env=test"]);
    assert!(out.contains("disk-1") && out.contains("1.0 GiB"), "{out}");
    let json = d.must_tern(&["--json", "volume", "list"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v[0]["name"], "disk-1");
    assert_eq!(v[0]["size_bytes"], 1u64 << 30);
    assert_eq!(v[0]["labels"]["env"], "test");
    d.must_tern(&["volume", "resize", "disk-1", "2G"]);
    let v: serde_json::Value =
        serde_json::from_str(&d.must_tern(&["--json", "volume", "get", "disk-1"])).unwrap();
    assert_eq!(v["size_bytes"], 2u64 << 30);

    let expect = |args: &[&str], code: i32, msg: &str| {
        let o = d.tern(args);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert_eq!(o.status.code(), Some(code), "tern {args:?}\n{}", text(&o));
        assert!(err.contains(msg), "tern {args:?}: stderr lacks {msg:?}\n{err}");
    };
    expect(&["volume", "create", "disk-1", "--size", "1G"], 4, "already exists");
    expect(&["volume", "create", "bad/name", "--size", "1G"], 2, "volume name");
    expect(&["volume", "create", "x", "--size", "12Q"], 2, "not a number");
    expect(&["volume", "create", "x", "--size", "1000"], 2, "multiple of 4096");
    expect(&["volume", "create", "x", "--size", "0"], 2, "zero");
    expect(&["volume", "create", "x", "--size", "100T"], 2, "maximum");
    expect(&["volume", "get", "nope"], 3, "not found");
    expect(&["volume", "delete", "nope"], 3, "not found");
    expect(&["volume", "resize", "disk-1", "1G"], 6, "allow_shrink");
    d.must_tern(&["volume", "resize", "disk-1", "1G", "--allow-shrink"]);
    d.must_tern(&["volume", "delete", "disk-1"]);
    expect(&["volume", "get", "disk-1"], 3, "not found");
    let list = d.must_tern(&["volume", "list"]);
    assert!(!list.contains("disk-1"), "{list}");

    // Unreachable endpoint: exit 5, not a hang.
    let o = tern_tests::run(
        30,
        tern_tests::bin("tern").to_str().unwrap(),
        &["--endpoint", "http://127.0.0.1:1", "volume", "list"],
    );
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    let status = d.must_tern(&["node", "status"]);
    assert!(status.contains("io_uring"), "{status}");
}
