//! Conversions between the wire types and kvtier's, in one place.

use kvtier::block::{Dtype, KvKind, KvLayout};
use kvtier::manager::ManagerStats;
use kvtier::manager::writeback::WritebackStats;
use kvtier::tier::blob::{BlobMode, BlobStats};
use kvtier::{BlockKey, ErrorKind, Namespace, NamespaceId, TierKind};
use tonic::Status;

use crate::proto;

/// A core error as a gRPC status with the same message.
pub fn status(e: &kvtier::Error) -> Status {
    let msg = e.to_string();
    match e.kind() {
        ErrorKind::InvalidArgument | ErrorKind::BlockSize => Status::invalid_argument(msg),
        ErrorKind::UnknownNamespace => Status::not_found(msg),
        ErrorKind::NoSpace => Status::resource_exhausted(msg),
        // Retryable: the client backs off and sends the request again.
        ErrorKind::Throttled | ErrorKind::Closed | ErrorKind::Unavailable => Status::unavailable(msg),
        ErrorKind::ChecksumMismatch => Status::data_loss(msg),
        ErrorKind::Config => Status::failed_precondition(msg),
        ErrorKind::NotFound => Status::not_found(msg),
        ErrorKind::AlreadyExists => Status::already_exists(msg),
        _ => Status::internal(msg),
    }
}

/// A 16-byte namespace id.
pub fn namespace_id(b: &[u8]) -> Result<NamespaceId, Status> {
    let a: [u8; 16] = b
        .try_into()
        .map_err(|_| Status::invalid_argument(format!("namespace_id must be 16 bytes, got {}", b.len())))?;
    Ok(NamespaceId(u128::from_le_bytes(a)))
}

/// 16-byte keys, at most `max` of them.
pub fn keys(raw: &[bytes::Bytes], max: usize) -> Result<Vec<BlockKey>, Status> {
    if raw.is_empty() {
        return Err(Status::invalid_argument("keys must not be empty"));
    }
    if raw.len() > max {
        return Err(Status::invalid_argument(format!(
            "{} keys exceed the limit of {max} per request",
            raw.len()
        )));
    }
    raw.iter()
        .enumerate()
        .map(|(i, k)| {
            let a: [u8; 16] = k[..]
                .try_into()
                .map_err(|_| Status::invalid_argument(format!("key {i} must be 16 bytes, got {}", k.len())))?;
            Ok(BlockKey::from_le_bytes(a))
        })
        .collect()
}

/// Wire bytes of a key.
pub fn key_bytes(k: &BlockKey) -> bytes::Bytes {
    bytes::Bytes::copy_from_slice(&k.to_le_bytes())
}

/// Wire tier of a core tier.
pub fn tier(t: TierKind) -> proto::Tier {
    match t {
        TierKind::Host => proto::Tier::Host,
        TierKind::Disk => proto::Tier::Disk,
        TierKind::Blob => proto::Tier::Blob,
        _ => proto::Tier::Unspecified,
    }
}

/// The name of a blob mode, as in the configuration.
pub fn blob_mode(m: BlobMode) -> &'static str {
    match m {
        BlobMode::CacheOnly => "cache-only",
        BlobMode::Writeback => "writeback",
    }
}

/// The Stats reply: every counter as JSON, and the blob tier's also as
/// typed fields.
pub fn stats(s: &ManagerStats) -> Result<proto::StatsResponse, serde_json::Error> {
    Ok(proto::StatsResponse {
        json: serde_json::to_string(s)?,
        blob: s.blob.as_ref().map(blob_stats),
        writeback: s.writeback.as_ref().map(writeback_stats),
        served_local_bytes: s.served_local_bytes,
        served_blob_bytes: s.served_blob_bytes,
        blob_promotions: s.blob_promotions,
        throughput_reduction: s.throughput_reduction,
        cluster: None,
    })
}

fn blob_stats(b: &BlobStats) -> proto::BlobStats {
    proto::BlobStats {
        mode: blob_mode(b.mode).into(),
        put_requests: b.put_requests,
        get_requests: b.get_requests,
        head_requests: b.head_requests,
        delete_requests: b.delete_requests,
        list_requests: b.list_requests,
        request_errors: b.request_errors,
        already_present: b.already_present,
        skipped_unavailable: b.skipped_unavailable,
        bytes_up: b.tier.bytes_written,
        bytes_down: b.tier.bytes_read,
        corrupt: b.tier.corrupt,
        hits: b.tier.hits,
        misses: b.tier.misses,
        uptime_s: b.uptime_s,
    }
}

fn writeback_stats(w: &WritebackStats) -> proto::WritebackStats {
    proto::WritebackStats {
        pending_blocks: w.pending_blocks,
        uploaded_blocks: w.uploaded_blocks,
        upload_failures: w.upload_failures,
        resumed_blocks: w.resumed_blocks,
        dropped_blocks: w.dropped_blocks,
        log_errors: w.log_errors,
    }
}

/// A core namespace from the wire, checked.
pub fn namespace(p: &proto::Namespace) -> Result<Namespace, Status> {
    let l = p
        .layout
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("namespace.layout is required"))?;
    let kind = match l.kind.as_str() {
        "kv" | "" => KvKind::Kv,
        "mla" => KvKind::Mla,
        other => {
            return Err(Status::invalid_argument(format!(
                "layout.kind {other:?}: expected \"kv\" or \"mla\""
            )));
        }
    };
    let dtype = match l.dtype.as_str() {
        "f16" => Dtype::F16,
        "bf16" => Dtype::Bf16,
        "f32" => Dtype::F32,
        "fp8e4m3" => Dtype::Fp8E4m3,
        "fp8e5m2" => Dtype::Fp8E5m2,
        other => {
            return Err(Status::invalid_argument(format!(
                "layout.dtype {other:?}: expected f16, bf16, f32, fp8e4m3 or fp8e5m2"
            )));
        }
    };
    let ns = Namespace {
        model_id: p.model_id.clone(),
        revision: p.revision.clone(),
        layout: KvLayout {
            num_layers: l.num_layers,
            kv_heads: l.kv_heads,
            head_dim: l.head_dim,
            block_tokens: l.block_tokens,
            kind,
            dtype,
        },
        tp_rank: p.tp_rank,
        tp_size: p.tp_size.max(1),
        salt: p.salt.clone(),
        lora: p.lora.clone(),
    };
    ns.validate().map_err(|e| status(&e))?;
    Ok(ns)
}

/// The wire form of a core namespace.
pub fn namespace_proto(ns: &Namespace) -> proto::Namespace {
    let l = &ns.layout;
    proto::Namespace {
        model_id: ns.model_id.clone(),
        revision: ns.revision.clone(),
        layout: Some(proto::Layout {
            num_layers: l.num_layers,
            kv_heads: l.kv_heads,
            head_dim: l.head_dim,
            block_tokens: l.block_tokens,
            kind: serde_json::to_value(l.kind)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
            dtype: serde_json::to_value(l.dtype)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
        }),
        tp_rank: ns.tp_rank,
        tp_size: ns.tp_size,
        salt: ns.salt.clone(),
        lora: ns.lora.clone(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn wire() -> proto::Namespace {
        proto::Namespace {
            model_id: "m".into(),
            revision: String::new(),
            layout: Some(proto::Layout {
                num_layers: 2,
                kv_heads: 2,
                head_dim: 64,
                block_tokens: 16,
                kind: "kv".into(),
                dtype: "bf16".into(),
            }),
            tp_rank: 0,
            tp_size: 1,
            salt: Some("s".into()),
            lora: None,
        }
    }

    #[test]
    fn namespace_round_trips() {
        let ns = namespace(&wire()).unwrap();
        assert_eq!(namespace_proto(&ns), wire());
        assert_eq!(ns.block_bytes(), 16 * 2 * 2 * 2 * 64 * 2);
    }

    /// A real manager's stats (host tier only, no blob).
    pub(crate) fn local_stats() -> ManagerStats {
        let mut host = kvtier::tier::host::HostConfig::with_capacity(1 << 20);
        host.pin_memory = false;
        kvtier::ManagerConfig::host_only(host).build().unwrap().stats()
    }

    /// Stats as a writeback node reports them, every counter distinct.
    pub(crate) fn blob_stats() -> ManagerStats {
        let mut s = local_stats();
        s.blob = Some(BlobStats {
            tier: kvtier::tier::TierStats {
                tier: Some(TierKind::Blob),
                hits: 11,
                misses: 12,
                bytes_written: 13,
                bytes_read: 14,
                corrupt: 15,
                ..Default::default()
            },
            mode: BlobMode::Writeback,
            put_requests: 1,
            get_requests: 2,
            head_requests: 3,
            delete_requests: 4,
            list_requests: 5,
            request_errors: 6,
            already_present: 7,
            skipped_unavailable: 8,
            uptime_s: 9.5,
        });
        s.writeback = Some(WritebackStats {
            pending_blocks: 21,
            uploaded_blocks: 22,
            upload_failures: 23,
            resumed_blocks: 24,
            dropped_blocks: 25,
            log_errors: 26,
            ..Default::default()
        });
        s.served_local_bytes = 300;
        s.served_blob_bytes = 100;
        s.blob_promotions = 31;
        s.throughput_reduction = 0.75;
        s
    }

    #[test]
    fn stats_carry_the_blob_counters_typed_and_as_json() {
        let r = stats(&local_stats()).unwrap();
        assert!(r.blob.is_none() && r.writeback.is_none(), "{r:?}");
        let json: serde_json::Value = serde_json::from_str(&r.json).unwrap();
        assert!(json["blob"].is_null() && json["writeback"].is_null(), "{json}");

        let r = stats(&blob_stats()).unwrap();
        let b = r.blob.as_ref().unwrap();
        assert_eq!(b.mode, "writeback");
        let kinds = [
            b.put_requests,
            b.get_requests,
            b.head_requests,
            b.delete_requests,
            b.list_requests,
            b.request_errors,
            b.already_present,
            b.skipped_unavailable,
        ];
        assert_eq!(kinds, [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(
            [b.hits, b.misses, b.bytes_up, b.bytes_down, b.corrupt],
            [11, 12, 13, 14, 15]
        );
        assert_eq!(b.uptime_s, 9.5);
        let w = r.writeback.as_ref().unwrap();
        assert_eq!(
            [
                w.pending_blocks,
                w.uploaded_blocks,
                w.upload_failures,
                w.resumed_blocks,
                w.dropped_blocks,
                w.log_errors
            ],
            [21, 22, 23, 24, 25, 26]
        );
        assert_eq!(
            (r.served_local_bytes, r.served_blob_bytes, r.blob_promotions),
            (300, 100, 31)
        );
        assert_eq!(r.throughput_reduction, 0.75);
        let json: serde_json::Value = serde_json::from_str(&r.json).unwrap();
        assert_eq!(json["blob"]["mode"], "writeback");
        assert_eq!(json["blob"]["tier"]["bytes_written"], 13);
        assert_eq!(json["writeback"]["pending_blocks"], 21);
        assert_eq!(json["throughput_reduction"], 0.75);
        assert_eq!(blob_mode(BlobMode::CacheOnly), "cache-only");
    }

    #[test]
    fn bad_wire_input_is_precise() {
        let mut w = wire();
        w.layout.as_mut().unwrap().dtype = "f64".into();
        let e = namespace(&w).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("layout.dtype \"f64\""), "{}", e.message());
        let e = keys(&[bytes::Bytes::from_static(&[1; 15])], 8).unwrap_err();
        assert!(
            e.message().contains("key 0 must be 16 bytes, got 15"),
            "{}",
            e.message()
        );
        assert!(namespace_id(&[0; 3]).is_err());
        assert!(keys(&[], 8).is_err());
    }
}
