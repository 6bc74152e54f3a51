//! Compiles proto/ into Rust with a pure-Rust protobuf compiler (protox), so building
//! kubekms needs no protoc on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/kubernetes/kms/v2/kms.proto",
        "proto/kubernetes/kms/v2/encrypted_object.proto",
        "proto/kubekms/v1/key_service.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(descriptors)?;
    Ok(())
}
