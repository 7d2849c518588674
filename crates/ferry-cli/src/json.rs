//! `--json`: messages in protobuf's canonical JSON mapping, with the field names of the proto
//! files (`status.reload.start_lsn`), read through the contract's own descriptors.

use anyhow::Context as _;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};

/// Serializes Ferry's messages as JSON.
#[derive(Debug)]
pub struct Json {
    pool: DescriptorPool,
}

impl Json {
    /// Loads the descriptors compiled into `ferry-proto`.
    pub fn new() -> anyhow::Result<Self> {
        let pool = DescriptorPool::decode(ferry_proto::FILE_DESCRIPTOR_SET)
            .context("reading the compiled protobuf descriptors")?;
        Ok(Self { pool })
    }

    /// `message` (of protobuf type `full_name`) as JSON; `pretty` spreads it over lines.
    fn encode(
        &self,
        full_name: &str,
        message: &impl Message,
        pretty: bool,
    ) -> anyhow::Result<String> {
        let descriptor = self
            .pool
            .get_message_by_name(full_name)
            .with_context(|| format!("{full_name} is not in the contract"))?;
        let dynamic = DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice())
            .with_context(|| format!("re-reading a {full_name}"))?;
        let options = SerializeOptions::new().use_proto_field_name(true);
        let mut out = Vec::new();
        if pretty {
            let mut serializer = serde_json::Serializer::pretty(&mut out);
            dynamic.serialize_with_options(&mut serializer, &options)?;
        } else {
            let mut serializer = serde_json::Serializer::new(&mut out);
            dynamic.serialize_with_options(&mut serializer, &options)?;
        }
        Ok(String::from_utf8(out)?)
    }

    /// A pipe, over several lines.
    pub fn pipe(&self, pipe: &ferry_proto::v1::Pipe) -> anyhow::Result<String> {
        self.encode("ferry.v1.Pipe", pipe, true)
    }

    /// A listing, over several lines.
    pub fn list(&self, list: &ferry_proto::v1::ListPipesResponse) -> anyhow::Result<String> {
        self.encode("ferry.v1.ListPipesResponse", list, true)
    }

    /// A delete's answer, over several lines.
    pub fn deleted(
        &self,
        response: &ferry_proto::v1::DeletePipeResponse,
    ) -> anyhow::Result<String> {
        self.encode("ferry.v1.DeletePipeResponse", response, true)
    }

    /// One watch message on one line.
    pub fn watch(&self, update: &ferry_proto::v1::WatchPipeResponse) -> anyhow::Result<String> {
        self.encode("ferry.v1.WatchPipeResponse", update, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::v1::{Pipe, PipeSpec, PipeState, PipeStatus, TableReload, WatchPipeResponse};

    #[test]
    fn messages_come_out_in_the_canonical_mapping_with_proto_names() {
        let json = Json::new().unwrap();
        let mut status = PipeStatus {
            reload: Some(TableReload {
                generation: 7,
                start_lsn: 42,
                ..Default::default()
            }),
            state_changed_at: Some(prost_types::Timestamp {
                seconds: 60,
                nanos: 0,
            }),
            ..Default::default()
        };
        status.set_state(PipeState::Running);
        let update = WatchPipeResponse {
            pipe: Some(Pipe {
                spec: Some(PipeSpec {
                    name: "demo".into(),
                    ..Default::default()
                }),
                status: Some(status),
                status_revision: 3,
            }),
            deleted: false,
        };
        let line = json.watch(&update).unwrap();
        assert!(!line.contains('\n'), "{line}");
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["pipe"]["spec"]["name"], "demo");
        assert_eq!(value["pipe"]["status"]["state"], "PIPE_STATE_RUNNING");
        assert_eq!(
            value["pipe"]["status"]["state_changed_at"],
            "1970-01-01T00:01:00Z"
        );
        // 64-bit integers are strings, as the mapping says.
        assert_eq!(value["pipe"]["status"]["reload"]["start_lsn"], "42");
        assert_eq!(value["pipe"]["status_revision"], "3");
        let pretty = json.pipe(update.pipe.as_ref().unwrap()).unwrap();
        assert!(pretty.contains("\n  \"spec\""), "{pretty}");
    }
}
