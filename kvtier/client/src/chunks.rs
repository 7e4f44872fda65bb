//! [`RemoteChunks`]: a checkpoint [`ChunkStore`] on a kvtierd, so that
//! `kvtier::checkpoint::Checkpoints` writes and restores through the
//! daemon's replicated chunk store.

use bytes::Bytes;
use kvtier::checkpoint::ChunkStore;
use kvtier::{BlockKey, Error, ErrorKind, Namespace, NamespaceId, Recycler};
use kvtier_proto::MAX_MESSAGE_BYTES;
use kvtier_proto::checkpoint_proto as pb;
use kvtier_proto::checkpoint_proto::checkpoints_client::CheckpointsClient;
use kvtier_proto::chunk::pieces_at_least_one;
use kvtier_proto::error::from_status;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::Auth;

/// The client side: a [`ChunkStore`] on a kvtierd, for
/// `kvtier::checkpoint::Checkpoints`. Its calls block: run them off async
/// tasks (e.g. in `spawn_blocking`).
#[derive(Debug, Clone)]
pub struct RemoteChunks {
    client: CheckpointsClient<tonic::service::interceptor::InterceptedService<Channel, Auth>>,
    group: pb::Group,
    rt: tokio::runtime::Handle,
    /// Aligned buffers the chunks are read into (a restore writes them
    /// with O_DIRECT).
    buffers: Recycler,
}

impl RemoteChunks {
    /// Chunks of `group` (at most `chunk_bytes` each) on the daemon behind
    /// `channel`; calls block on `rt`.
    pub fn new(channel: Channel, auth: Auth, group: &str, chunk_bytes: u32, rt: tokio::runtime::Handle) -> Self {
        let client = CheckpointsClient::with_interceptor(channel, auth)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Self {
            client,
            group: pb::Group {
                group: group.to_string(),
                chunk_bytes,
                local: false,
            },
            rt,
            buffers: Recycler::new(chunk_bytes as usize, 2 * kvtier::checkpoint::CHUNKS_IN_FLIGHT),
        }
    }

    /// The namespace of the group's chunks.
    pub fn namespace(&self) -> NamespaceId {
        Namespace::checkpoints(&self.group.group, self.group.chunk_bytes).id()
    }

    fn chunk_ref(&self, key: BlockKey) -> pb::ChunkRef {
        pb::ChunkRef {
            group: Some(self.group.clone()),
            key: Bytes::copy_from_slice(&key.to_le_bytes()),
        }
    }
}

impl ChunkStore for RemoteChunks {
    fn put_chunk(&self, key: BlockKey, data: Bytes) -> kvtier::Result<bool> {
        // The first message names the chunk; an empty chunk is one message.
        let pieces: Vec<pb::ChunkWrite> = pieces_at_least_one(&data)
            .enumerate()
            .map(|(i, d)| pb::ChunkWrite {
                group: (i == 0).then(|| self.group.clone()),
                key: if i == 0 {
                    Bytes::copy_from_slice(&key.to_le_bytes())
                } else {
                    Bytes::new()
                },
                data: d,
                chunk_len: if i == 0 { data.len() as u64 } else { 0 },
            })
            .collect();
        let mut c = self.client.clone();
        self.rt.block_on(async move {
            c.put_chunk(tokio_stream::iter(pieces))
                .await
                .map(|r| r.into_inner().stored)
                .map_err(from_status)
        })
    }

    fn get_chunk(&self, key: BlockKey) -> kvtier::Result<Option<Bytes>> {
        let mut c = self.client.clone();
        let req = self.chunk_ref(key);
        let mut buf = self.buffers.take();
        self.rt.block_on(async move {
            let mut s = c.get_chunk(req).await.map_err(from_status)?.into_inner();
            let mut len = 0;
            while let Some(p) = s.next().await {
                let p = p.map_err(from_status)?;
                if !p.found {
                    return Ok(None);
                }
                let end = len + p.data.len();
                if end > buf.len() {
                    return Err(Error::new(
                        ErrorKind::ChecksumMismatch,
                        format!("kvtierd sent more than a chunk ({} bytes) for {key}", buf.len()),
                    ));
                }
                buf.whole_mut()[len..end].copy_from_slice(&p.data);
                len = end;
            }
            buf.set_len(len);
            Ok(Some(buf.into_bytes()))
        })
    }

    fn remove_chunk(&self, key: BlockKey) -> kvtier::Result<()> {
        let mut c = self.client.clone();
        let req = self.chunk_ref(key);
        self.rt
            .block_on(async move { c.remove_chunk(req).await.map(|_| ()).map_err(from_status) })
    }

    fn names(&self) -> kvtier::Result<Vec<String>> {
        let mut c = self.client.clone();
        let g = self.group.clone();
        self.rt
            .block_on(async move { c.names(g).await.map(|r| r.into_inner().names).map_err(from_status) })
    }

    fn add_name(&self, name: &str) -> kvtier::Result<()> {
        let mut c = self.client.clone();
        let req = pb::NameRequest {
            group: Some(self.group.clone()),
            name: name.to_string(),
        };
        self.rt
            .block_on(async move { c.add_name(req).await.map(|_| ()).map_err(from_status) })
    }

    fn remove_name(&self, name: &str) -> kvtier::Result<()> {
        let mut c = self.client.clone();
        let req = pb::NameRequest {
            group: Some(self.group.clone()),
            name: name.to_string(),
        };
        self.rt
            .block_on(async move { c.remove_name(req).await.map(|_| ()).map_err(from_status) })
    }
}
