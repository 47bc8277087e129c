//! Generates the Kafka sink's Protocol Buffers messages from the schema users compile too
//! (docs/schema/flows.proto), with protox, a protobuf compiler in Rust: building needs no
//! protoc.

fn main() {
    let schema = "../docs/schema";
    let proto = format!("{schema}/flows.proto");
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = match protox::compile([&proto], [schema]) {
        Ok(descriptors) => descriptors,
        Err(error) => panic!("compiling {proto}: {error}"),
    };
    if let Err(error) = prost_build::Config::new().compile_fds(descriptors) {
        panic!("generating Rust from {proto}: {error}");
    }
}
