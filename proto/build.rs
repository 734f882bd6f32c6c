//! Compiles `tern/v1/*.proto` with protox (pure Rust): no protoc install step.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "tern/v1/common.proto",
        "tern/v1/admin.proto",
        "tern/v1/blockio.proto",
        "tern/v1/cluster.proto",
        "tern/v1/raft.proto",
        "tern/v1/manager.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["."])?;
    tonic_prost_build::configure().bytes(".tern.v1").compile_fds(fds)?;
    Ok(())
}
