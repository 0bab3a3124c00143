//! Generates the gRPC callback client (and the server the tests use as a receiver) from
//! `proto/` with protox, a pure-Rust protobuf compiler, so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fds = protox::compile(["chime/v1/callback.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    // compile_fds is not told which files it read, and sqlx::migrate! embeds the migrations.
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=migrations");
    Ok(())
}
