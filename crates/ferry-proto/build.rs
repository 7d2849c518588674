//! Generates Rust code and a file descriptor set (for server reflection) from `proto/`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = ["pipe.proto", "pipe_service.proto", "worker.proto"]
        .map(|file| proto_root.join("ferry/v1").join(file));
    let descriptor = PathBuf::from(std::env::var("OUT_DIR")?).join("ferry_descriptor.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptor)
        // Passwords must never reach a log through `{:?}`: lib.rs implements a redacting Debug.
        .skip_debug(["ferry.v1.PipeSecrets"])
        .compile_protos(&files, std::slice::from_ref(&proto_root))?;
    println!("cargo:rerun-if-changed={}", proto_root.display());
    Ok(())
}
