//! The namespaces registered, with each one's replication, persisted in the
//! data dir so that a restarted daemon serves what its SSD holds without
//! clients registering again.
//!
//! The file is a JSON list of namespaces; an entry may carry a
//! `replication` object (`{"replicas": 3, "write_quorum": 2}`). Files
//! written before clusters existed have none: those namespaces have R = 1.

use kvtier::replication::Replication;
use kvtier::{BlockManager, Namespace, NamespaceId};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use tonic::Status;

use crate::status;
use crate::status_of;
use kvtier::ErrorKind;

/// One entry of the file.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    #[serde(flatten)]
    namespace: Namespace,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    replication: Option<Replication>,
}

/// The namespaces of one daemon.
#[derive(Debug)]
pub struct Registry {
    path: PathBuf,
    manager: Arc<BlockManager>,
    reps: RwLock<HashMap<NamespaceId, Replication>>,
    /// Serializes registrations, so the file matches the manager's list.
    lock: Mutex<()>,
}

/// What a registration did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registered {
    /// The namespace's id.
    pub id: NamespaceId,
    /// Its replication (the one registered first when asked again).
    pub replication: Replication,
    /// Whether this call added it.
    pub new: bool,
}

impl Registry {
    /// Opens the registry at `path` and registers what it holds with
    /// `manager`.
    ///
    /// An unreadable file is [`ErrorKind::Io`]; one that does not parse, or
    /// names a namespace the manager refuses, is [`ErrorKind::Config`].
    pub fn open(path: PathBuf, manager: Arc<BlockManager>) -> kvtier::Result<Self> {
        let entries: Vec<Entry> = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                kvtier::Error::with_source(
                    ErrorKind::Config,
                    format!("namespace registry {}: {e}", path.display()),
                    e,
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(kvtier::Error::io(format!("read {}", path.display()), e)),
        };
        let mut reps = HashMap::new();
        for e in entries {
            let id = manager.register_namespace(&e.namespace).map_err(|err| {
                kvtier::Error::new(
                    ErrorKind::Config,
                    format!("namespace {} from {}: {err}", e.namespace.model_id, path.display()),
                )
            })?;
            reps.insert(id, e.replication.unwrap_or(Replication::strong(1)));
        }
        Ok(Self {
            path,
            manager,
            reps: RwLock::new(reps),
            lock: Mutex::new(()),
        })
    }

    /// The replication of `ns`: R = 1 unless registered otherwise.
    pub fn replication(&self, ns: NamespaceId) -> Replication {
        self.reps.read().get(&ns).copied().unwrap_or(Replication::strong(1))
    }

    /// Whether `ns` holds files (checkpoint chunks, S3 objects): see
    /// [`Namespace::holds_files`].
    pub fn holds_files(&self, ns: NamespaceId) -> bool {
        self.manager.holds_files(ns)
    }

    /// Every namespace with its replication.
    pub fn all(&self) -> Vec<(NamespaceId, Namespace, Replication)> {
        self.manager
            .namespaces()
            .into_iter()
            .map(|(id, ns)| {
                let r = self.replication(id);
                (id, ns, r)
            })
            .collect()
    }

    /// Registers `ns` (idempotent). `rep` is the replication asked for:
    /// `None` keeps the one registered (R = 1 for a new namespace); a
    /// different one for a known namespace is refused unless `keep_first`,
    /// when the registered one stays (peers replaying a registration).
    pub fn register(&self, ns: &Namespace, rep: Option<Replication>, keep_first: bool) -> Result<Registered, Status> {
        let _g = self.lock.lock();
        let known = self.manager.block_bytes(ns.id()).is_ok();
        if known {
            let have = self.replication(ns.id());
            if let Some(want) = rep.filter(|w| *w != have && !keep_first) {
                return Err(status_of(
                    ErrorKind::Config,
                    format!(
                        "namespace {} is registered with replicas {} and write_quorum {}: it cannot change to replicas {} and write_quorum {}",
                        ns.model_id,
                        have.replicas,
                        have.w(),
                        want.replicas,
                        want.w()
                    ),
                ));
            }
            return Ok(Registered {
                id: ns.id(),
                replication: have,
                new: false,
            });
        }
        let rep = rep.unwrap_or(Replication::strong(1));
        let id = self.manager.register_namespace(ns).map_err(|e| status(&e))?;
        self.reps.write().insert(id, rep);
        let entries: Vec<Entry> = self
            .all()
            .into_iter()
            .map(|(_, namespace, r)| Entry {
                namespace,
                replication: (r != Replication::strong(1)).then_some(r),
            })
            .collect();
        self.save(&entries)
            .map_err(|e| status_of(ErrorKind::Internal, format!("persist the namespace registry: {e}")))?;
        Ok(Registered {
            id,
            replication: rep,
            new: true,
        })
    }

    /// Writes the whole list through the one durable replace (temporary
    /// file, fsync, rename, directory fsync).
    fn save(&self, all: &[Entry]) -> kvtier::Result<()> {
        let bytes = serde_json::to_vec_pretty(all).expect("namespaces serialize");
        kvtier::fsio::replace_durably(&self.path, &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_read_the_old_format_and_write_replication_only_when_not_one() {
        let ns = kvtier::Namespace::new(
            "m",
            kvtier::block::KvLayout {
                num_layers: 1,
                kv_heads: 1,
                head_dim: 16,
                block_tokens: 64,
                kind: kvtier::block::KvKind::Kv,
                dtype: kvtier::block::Dtype::F16,
            },
        );
        // A registry written before clusters: plain namespaces.
        let old = serde_json::to_string(&vec![ns.clone()]).unwrap();
        let e: Vec<Entry> = serde_json::from_str(&old).unwrap();
        assert_eq!(e[0].namespace, ns);
        assert_eq!(e[0].replication, None);
        let r3 = Entry {
            namespace: ns.clone(),
            replication: Some(Replication {
                replicas: 3,
                write_quorum: Some(2),
            }),
        };
        let text = serde_json::to_string(&r3).unwrap();
        let back: Entry = serde_json::from_str(&text).unwrap();
        assert_eq!(back.replication, r3.replication);
        assert_eq!(back.namespace, ns);
        let one = Entry {
            namespace: ns,
            replication: None,
        };
        assert_eq!(
            serde_json::to_string(&one).unwrap(),
            serde_json::to_string(&one.namespace).unwrap()
        );
    }
}
