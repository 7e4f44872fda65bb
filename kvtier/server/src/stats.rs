//! The Stats reply: the manager's counters as JSON, and the blob tier's and
//! the writeback's also as typed fields.

use kvtier::manager::ManagerStats;
use kvtier::manager::writeback::WritebackStats;
use kvtier::tier::blob::BlobStats;

use crate::proto;

/// The Stats reply: every counter as JSON, and the blob tier's also as
/// typed fields.
pub fn reply(s: &ManagerStats) -> Result<proto::StatsResponse, serde_json::Error> {
    Ok(proto::StatsResponse {
        json: serde_json::to_string(s)?,
        blob: s.blob.as_ref().map(blob_stats),
        writeback: s.writeback.as_ref().map(writeback_stats),
        served_local_bytes: s.served_local_bytes,
        served_blob_bytes: s.served_blob_bytes,
        blob_promotions: s.blob_promotions,
        throughput_reduction: s.throughput_reduction,
        cluster: None,
        repair: None,
    })
}

/// Adds read repair's and the scrub's counters to a Stats reply: typed,
/// and in the JSON under `repair`.
pub fn add_repair(reply: &mut proto::StatsResponse, r: proto::RepairStats) -> Result<(), serde_json::Error> {
    let mut json: serde_json::Value = serde_json::from_str(&reply.json)?;
    if let Some(o) = json.as_object_mut() {
        o.insert(
            "repair".into(),
            serde_json::json!({
                "corrupt_found_local_read": r.corrupt_found_local_read,
                "corrupt_found_peer_read": r.corrupt_found_peer_read,
                "corrupt_found_scrub": r.corrupt_found_scrub,
                "repaired_local": r.repaired_local,
                "repaired_peer": r.repaired_peer,
                "repair_failures": r.repair_failures,
                "no_good_copy": r.no_good_copy,
                "scrub_enabled": r.scrub_enabled,
                "scrub_passes": r.scrub_passes,
                "scrub_blocks": r.scrub_blocks,
                "scrub_bytes": r.scrub_bytes,
            }),
        );
    }
    reply.json = serde_json::to_string(&json)?;
    reply.repair = Some(r);
    Ok(())
}

fn blob_stats(b: &BlobStats) -> proto::BlobStats {
    proto::BlobStats {
        mode: b.mode.name().into(),
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
        uploaded_by_peers: w.uploaded_by_peers,
        peer_checks: w.peer_checks,
        confirmed_by_peers: w.confirmed_by_peers,
        taken_over: w.taken_over,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use kvtier::TierKind;
    use kvtier::tier::blob::BlobMode;

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
            uploaded_by_peers: 27,
            peer_checks: 28,
            confirmed_by_peers: 29,
            taken_over: 30,
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
        let r = reply(&local_stats()).unwrap();
        assert!(r.blob.is_none() && r.writeback.is_none(), "{r:?}");
        let json: serde_json::Value = serde_json::from_str(&r.json).unwrap();
        assert!(json["blob"].is_null() && json["writeback"].is_null(), "{json}");

        let r = reply(&blob_stats()).unwrap();
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
                w.log_errors,
                w.uploaded_by_peers,
                w.peer_checks,
                w.confirmed_by_peers,
                w.taken_over,
            ],
            [21, 22, 23, 24, 25, 26, 27, 28, 29, 30]
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
        assert_eq!(BlobMode::CacheOnly.name(), "cache-only");
    }

    #[test]
    fn repair_counters_go_in_typed_and_as_json() {
        let mut r = reply(&local_stats()).unwrap();
        let rs = proto::RepairStats {
            corrupt_found_local_read: 1,
            corrupt_found_peer_read: 2,
            corrupt_found_scrub: 3,
            repaired_local: 4,
            repaired_peer: 5,
            repair_failures: 6,
            no_good_copy: 7,
            scrub_enabled: true,
            scrub_passes: 8,
            scrub_blocks: 9,
            scrub_bytes: 10,
        };
        add_repair(&mut r, rs).unwrap();
        assert_eq!(r.repair, Some(rs));
        let json: serde_json::Value = serde_json::from_str(&r.json).unwrap();
        assert_eq!(json["repair"]["repaired_peer"], 5);
        assert_eq!(json["repair"]["scrub_enabled"], true);
        assert_eq!(json["repair"]["scrub_bytes"], 10);
        assert!(json["lookups"].is_u64(), "the manager's counters stay: {json}");
    }
}
