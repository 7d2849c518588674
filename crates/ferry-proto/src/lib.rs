//! Ferry's protobuf contract: the public `PipeService`, the worker introspection service and the
//! messages stored in etcd. Generated from `proto/ferry/v1` at build time.

#![allow(missing_docs, missing_debug_implementations)]

/// `ferry.v1`: messages and services.
pub mod v1 {
    tonic::include_proto!("ferry.v1");
}

/// Encoded `FileDescriptorSet` of `proto/ferry/v1`, served through gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ferry_descriptor");

impl std::fmt::Debug for v1::PipeSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = |secret: &str| {
            if secret.is_empty() {
                "<empty>"
            } else {
                "<redacted>"
            }
        };
        f.debug_struct("PipeSecrets")
            .field("source_password", &shown(&self.source_password))
            .field("destination_password", &shown(&self.destination_password))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn secrets_never_print() {
        let request = super::v1::CreatePipeRequest {
            spec: None,
            secrets: Some(super::v1::PipeSecrets {
                source_password: "hunter2".into(),
                destination_password: String::new(),
            }),
        };
        let printed = format!("{request:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(
            printed.contains("<redacted>") && printed.contains("<empty>"),
            "{printed}"
        );
    }
}
