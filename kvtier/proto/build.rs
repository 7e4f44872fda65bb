fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/kvtier/v1/kvtier.proto");
    println!("cargo:rerun-if-changed=proto/kvtier/checkpoint/v1/checkpoint.proto");
    tonic_prost_build::configure()
        // Block bytes arrive as `Bytes`: handed on without a copy.
        .bytes(".kvtier.v1")
        .bytes(".kvtier.checkpoint.v1")
        .compile_protos(
            &[
                "proto/kvtier/v1/kvtier.proto",
                "proto/kvtier/checkpoint/v1/checkpoint.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}
