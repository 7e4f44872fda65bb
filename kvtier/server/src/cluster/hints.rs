//! The hint log: blocks this node holds for a replica that lacks them, to
//! hand back when it answers again. Durable in the data dir, so a node that
//! restarts still delivers. Two kinds of node hold hints: a stand-in, for a
//! down replica it took a write for, and a write's coordinator, for a
//! replica whose copy failed while it was up or suspect (the coordinator
//! keeps a copy of its own until delivery). Either way the replica's copy
//! is *out of sync*: [`HintLog::counts`] is the per-member view.
//!
//! An append-only file of records, each self-describing and checked:
//!
//! ```text
//! magic "KVH1" | kind u8 (1 hint, 2 done) | id_len u8 | namespace u128 LE
//! | key u128 LE | node id (id_len bytes, UTF-8) | crc32c u32 LE of all before
//! ```
//!
//! "done" cancels a hint (delivered, or given up). Opening reads records up
//! to the first that fails its check (a torn tail after a crash) and
//! rewrites the file with the pending hints only.

use kvtier::replication::placement::NodeId;
use kvtier::{BlockKey, NamespaceId};
use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"KVH1";
const HINT: u8 = 1;
const DONE: u8 = 2;
/// Magic, kind, id length, namespace, key.
const FIXED: usize = 4 + 1 + 1 + 16 + 16;

/// Pending hints: per original node, the (namespace, key) pairs.
type Pending = BTreeMap<NodeId, BTreeSet<(NamespaceId, BlockKey)>>;

/// The log and the pending set it describes.
#[derive(Debug)]
pub struct HintLog {
    path: PathBuf,
    state: Mutex<(File, Pending)>,
}

fn encode(out: &mut Vec<u8>, kind: u8, node: &NodeId, ns: NamespaceId, key: BlockKey) {
    let id = node.0.as_bytes();
    assert!(id.len() <= usize::from(u8::MAX), "node ids are at most 255 bytes");
    let start = out.len();
    out.extend_from_slice(MAGIC);
    out.push(kind);
    out.push(id.len() as u8);
    out.extend_from_slice(&ns.0.to_le_bytes());
    out.extend_from_slice(&key.to_le_bytes());
    out.extend_from_slice(id);
    let crc = crc32c::crc32c(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// Parses records from `b` until the end or the first bad one.
fn decode(mut b: &[u8], pending: &mut Pending) -> usize {
    let mut n = 0;
    while b.len() >= FIXED {
        if &b[..4] != MAGIC || !matches!(b[4], HINT | DONE) {
            break;
        }
        let id_len = usize::from(b[5]);
        let len = FIXED + id_len + 4;
        if b.len() < len {
            break;
        }
        let crc = u32::from_le_bytes(b[len - 4..len].try_into().expect("4 bytes"));
        if crc32c::crc32c(&b[..len - 4]) != crc {
            break;
        }
        let Ok(id) = std::str::from_utf8(&b[FIXED..FIXED + id_len]) else {
            break;
        };
        let ns = NamespaceId(u128::from_le_bytes(b[6..22].try_into().expect("16 bytes")));
        let key = BlockKey(u128::from_le_bytes(b[22..38].try_into().expect("16 bytes")));
        let node = NodeId(id.to_string());
        if b[4] == HINT {
            pending.entry(node).or_default().insert((ns, key));
        } else if let Some(s) = pending.get_mut(&node) {
            s.remove(&(ns, key));
            if s.is_empty() {
                pending.remove(&node);
            }
        }
        n += 1;
        b = &b[len..];
    }
    n
}

impl HintLog {
    /// Opens (or creates) the log at `path`, compacted to its pending hints.
    /// A log that cannot be read or rewritten is [`kvtier::ErrorKind::Io`],
    /// naming the file.
    pub fn open(path: &Path) -> kvtier::Result<Self> {
        Self::open_text(path).map_err(|m| kvtier::Error::new(kvtier::ErrorKind::Io, m))
    }

    fn open_text(path: &Path) -> Result<Self, String> {
        let mut pending = Pending::new();
        match std::fs::read(path) {
            Ok(b) => {
                decode(&b, &mut pending);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("read the hint log {}: {e}", path.display())),
        }
        let mut buf = Vec::new();
        for (node, set) in &pending {
            for (ns, key) in set {
                encode(&mut buf, HINT, node, *ns, *key);
            }
        }
        kvtier::fsio::replace_durably(path, &buf)
            .map_err(|e| format!("rewrite the hint log {}: {e}", path.display()))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| format!("open the hint log {}: {e}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            state: Mutex::new((file, pending)),
        })
    }

    fn append(&self, kind: u8, node: &NodeId, ns: NamespaceId, keys: &[BlockKey], sync: bool) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(keys.len() * (FIXED + node.0.len() + 4));
        for k in keys {
            encode(&mut buf, kind, node, ns, *k);
        }
        let mut st = self.state.lock();
        st.0.write_all(&buf)?;
        if sync {
            st.0.sync_data()?;
        }
        let pending = &mut st.1;
        if kind == HINT {
            pending
                .entry(node.clone())
                .or_default()
                .extend(keys.iter().map(|k| (ns, *k)));
        } else if let Some(s) = pending.get_mut(node) {
            for k in keys {
                s.remove(&(ns, *k));
            }
            if s.is_empty() {
                pending.remove(node);
            }
        }
        if pending.is_empty() {
            // Nothing pending: the log starts over, so it never grows
            // beyond the hints of one outage.
            st.0.set_len(0)?;
        }
        Ok(())
    }

    /// Records, durably, that this node holds `keys` of `ns` for `node`.
    pub fn add(&self, node: &NodeId, ns: NamespaceId, keys: &[BlockKey]) -> std::io::Result<()> {
        self.append(HINT, node, ns, keys, true)
    }

    /// Cancels hints (delivered or given up). Not synced: a hint that comes
    /// back after a crash is delivered again, which is harmless.
    pub fn done(&self, node: &NodeId, ns: NamespaceId, keys: &[BlockKey]) -> std::io::Result<()> {
        self.append(DONE, node, ns, keys, false)
    }

    /// Hints pending, in all.
    pub fn pending(&self) -> usize {
        self.state.lock().1.values().map(BTreeSet::len).sum()
    }

    /// The pending hints for `node`, grouped by namespace.
    pub fn for_node(&self, node: &NodeId) -> BTreeMap<NamespaceId, Vec<BlockKey>> {
        let mut out: BTreeMap<NamespaceId, Vec<BlockKey>> = BTreeMap::new();
        if let Some(s) = self.state.lock().1.get(node) {
            for (ns, k) in s {
                out.entry(*ns).or_default().push(*k);
            }
        }
        out
    }

    /// Whether a hint for `key` of `ns` is pending for `node`: its copy is
    /// known missing.
    pub fn contains(&self, node: &NodeId, ns: NamespaceId, key: BlockKey) -> bool {
        self.state.lock().1.get(node).is_some_and(|s| s.contains(&(ns, key)))
    }

    /// Hints pending per node: the keys known missing on each.
    pub fn counts(&self) -> BTreeMap<NodeId, usize> {
        self.state.lock().1.iter().map(|(n, s)| (n.clone(), s.len())).collect()
    }

    /// The nodes hints are pending for.
    pub fn nodes(&self) -> Vec<NodeId> {
        self.state.lock().1.keys().cloned().collect()
    }

    /// Where the log lives.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_survive_reopen_and_done_cancels_them_and_a_torn_tail_is_ignored() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("hints.log");
        let (b, c): (NodeId, NodeId) = ("b".into(), "c".into());
        let ns = NamespaceId(7);
        {
            let log = HintLog::open(&p).unwrap();
            log.add(&b, ns, &[BlockKey(1), BlockKey(2), BlockKey(3)]).unwrap();
            log.add(&c, ns, &[BlockKey(4)]).unwrap();
            log.done(&b, ns, &[BlockKey(2)]).unwrap();
            assert_eq!(log.pending(), 3);
        }
        // A torn record at the end: ignored.
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(&MAGIC[..]).unwrap();
        f.write_all(&[HINT, 1, 0, 0]).unwrap();
        drop(f);
        let log = HintLog::open(&p).unwrap();
        assert_eq!(log.pending(), 3);
        assert_eq!(log.for_node(&b)[&ns], vec![BlockKey(1), BlockKey(3)]);
        assert_eq!(log.nodes(), vec![b.clone(), c.clone()]);
        assert!(log.contains(&b, ns, BlockKey(3)));
        assert!(!log.contains(&b, ns, BlockKey(2)), "done");
        assert!(!log.contains(&c, NamespaceId(8), BlockKey(4)), "another namespace");
        assert_eq!(log.counts(), BTreeMap::from([(b.clone(), 2), (c.clone(), 1)]));
        log.done(&c, ns, &[BlockKey(4)]).unwrap();
        assert_eq!(log.nodes(), vec![b.clone()]);
        // All done: the file is emptied, and appends start over.
        log.done(&b, ns, &[BlockKey(1), BlockKey(3)]).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 0);
        log.add(&b, ns, &[BlockKey(1)]).unwrap();
        log.add(&b, ns, &[BlockKey(3)]).unwrap();
        // A flipped bit stops the read at that record.
        drop(log);
        let mut raw = std::fs::read(&p).unwrap();
        raw[10] ^= 1;
        std::fs::write(&p, &raw).unwrap();
        // Reading stops at the first bad record: what follows counts as torn.
        assert_eq!(HintLog::open(&p).unwrap().pending(), 0);
    }
}
