//! Ferry's protobuf contract: the public `PipeService`, the worker introspection service and the
//! messages stored in etcd. Generated from `proto/ferry/v1` at build time.

#![allow(missing_docs, missing_debug_implementations)]

/// `ferry.v1`: messages and services.
pub mod v1 {
    tonic::include_proto!("ferry.v1");
}

/// Encoded `FileDescriptorSet` of `proto/ferry/v1`, served through gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ferry_descriptor");
