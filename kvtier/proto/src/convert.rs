//! Conversions between the wire types and kvtier's, in one place.

use kvtier::block::{Dtype, KvKind, KvLayout};
use kvtier::checkpoint::validate_name;
use kvtier::events::{Change, EventPage, TierEvent, TierSet};
use kvtier::{BlockKey, Namespace, NamespaceId, TierKind};
use tonic::Status;

use crate::checkpoint_proto;
use crate::error::{invalid, status};
use crate::proto;

/// A 16-byte namespace id.
pub fn namespace_id(b: &[u8]) -> Result<NamespaceId, Status> {
    let a: [u8; 16] = b
        .try_into()
        .map_err(|_| invalid(format!("namespace_id must be 16 bytes, got {}", b.len())))?;
    Ok(NamespaceId(u128::from_le_bytes(a)))
}

/// 16-byte keys, at most `max` of them.
pub fn keys(raw: &[bytes::Bytes], max: usize) -> Result<Vec<BlockKey>, Status> {
    if raw.is_empty() {
        return Err(invalid("keys must not be empty"));
    }
    if raw.len() > max {
        return Err(invalid(format!(
            "{} keys exceed the limit of {max} per request",
            raw.len()
        )));
    }
    raw.iter()
        .enumerate()
        .map(|(i, k)| {
            let a: [u8; 16] = k[..]
                .try_into()
                .map_err(|_| invalid(format!("key {i} must be 16 bytes, got {}", k.len())))?;
            Ok(BlockKey::from_le_bytes(a))
        })
        .collect()
}

/// Wire bytes of a key.
pub fn key_bytes(k: &BlockKey) -> bytes::Bytes {
    bytes::Bytes::copy_from_slice(&k.to_le_bytes())
}

/// `["a", "b"]` as `a, b`, for the errors that list what is accepted.
fn names<const N: usize>(all: [&str; N]) -> String {
    all.join(", ")
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

/// Core tier of a wire tier: `None` for one this node's tiers never are
/// (unspecified, peer).
pub fn tier_kind(t: proto::Tier) -> Option<TierKind> {
    match t {
        proto::Tier::Host => Some(TierKind::Host),
        proto::Tier::Disk => Some(TierKind::Disk),
        proto::Tier::Blob => Some(TierKind::Blob),
        proto::Tier::Unspecified | proto::Tier::Peer => None,
    }
}

/// A page of tier events on the wire.
pub fn event_page(p: &EventPage) -> proto::EventsResponse {
    proto::EventsResponse {
        epoch: p.epoch,
        cursor: p.cursor,
        resync: p.resync,
        events: p
            .events
            .iter()
            .map(|e| proto::TierEvent {
                seq: e.seq,
                change: match e.change {
                    Change::Stored => proto::EventChange::Stored,
                    Change::Removed => proto::EventChange::Removed,
                    _ => proto::EventChange::Unspecified,
                } as i32,
                tier: tier(e.tier) as i32,
                key: key_bytes(&e.key),
            })
            .collect(),
    }
}

/// A page of tier events from the wire, checked: a peer that sends an
/// event this version cannot read is refused, not half-read.
pub fn event_page_from_wire(r: proto::EventsResponse) -> Result<EventPage, Status> {
    let events = r
        .events
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let change = match proto::EventChange::try_from(e.change) {
                Ok(proto::EventChange::Stored) => Change::Stored,
                Ok(proto::EventChange::Removed) => Change::Removed,
                _ => return Err(invalid(format!("event {i}: unknown change {}", e.change))),
            };
            let tier = proto::Tier::try_from(e.tier)
                .ok()
                .and_then(tier_kind)
                .ok_or_else(|| invalid(format!("event {i}: unknown tier {}", e.tier)))?;
            let key = keys(std::slice::from_ref(&e.key), 1)?[0];
            Ok(TierEvent {
                seq: e.seq,
                change,
                tier,
                key,
            })
        })
        .collect::<Result<Vec<_>, Status>>()?;
    Ok(EventPage {
        epoch: r.epoch,
        cursor: r.cursor,
        resync: r.resync,
        events,
    })
}

/// The tiers of each key of a Locate answer.
pub fn located_from_wire(r: proto::LocateResponse) -> Vec<TierSet> {
    r.keys
        .into_iter()
        .map(|k| {
            k.tiers
                .into_iter()
                .filter_map(|t| proto::Tier::try_from(t).ok().and_then(tier_kind))
                .collect()
        })
        .collect()
}

/// A core namespace from the wire, checked.
pub fn namespace(p: &proto::Namespace) -> Result<Namespace, Status> {
    let l = p
        .layout
        .as_ref()
        .ok_or_else(|| invalid("namespace.layout is required"))?;
    // An empty kind is the wire's default: separate K and V.
    let kind = match l.kind.as_str() {
        "" => KvKind::Kv,
        name => KvKind::from_name(name).ok_or_else(|| {
            invalid(format!(
                "layout.kind {name:?}: expected one of {}",
                names(KvKind::ALL.map(KvKind::name))
            ))
        })?,
    };
    let dtype = Dtype::from_name(&l.dtype).ok_or_else(|| {
        invalid(format!(
            "layout.dtype {:?}: expected one of {}",
            l.dtype,
            names(Dtype::ALL.map(Dtype::name))
        ))
    })?;
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
            kind: l.kind.name().into(),
            dtype: l.dtype.name().into(),
        }),
        tp_rank: ns.tp_rank,
        tp_size: ns.tp_size,
        salt: ns.salt.clone(),
        lora: ns.lora.clone(),
    }
}

/// Smallest and largest chunk a group may use.
pub const CHUNK_BYTES_RANGE: std::ops::RangeInclusive<u32> = (1 << 20)..=(256 << 20);

/// Checks a group and answers its namespace.
pub fn group_namespace(g: &checkpoint_proto::Group) -> Result<Namespace, Status> {
    if g.group.len() > 64 || validate_name(&g.group).is_err() {
        return Err(invalid(format!(
            "checkpoint group {:?}: 1 to 64 letters, digits, '.', '_' and '-'",
            g.group
        )));
    }
    if !CHUNK_BYTES_RANGE.contains(&g.chunk_bytes) {
        return Err(invalid(format!(
            "chunk_bytes {} must be between {} and {}",
            g.chunk_bytes,
            CHUNK_BYTES_RANGE.start(),
            CHUNK_BYTES_RANGE.end()
        )));
    }
    Ok(Namespace::checkpoints(&g.group, g.chunk_bytes))
}

/// The wire tier's name, as clients print it. Exhaustive, so a tier added
/// to the protocol must be named here.
pub fn tier_name(t: proto::Tier) -> &'static str {
    match t {
        proto::Tier::Unspecified => "unknown",
        proto::Tier::Host => "host",
        proto::Tier::Disk => "disk",
        proto::Tier::Blob => "blob",
        proto::Tier::Peer => "peer",
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
