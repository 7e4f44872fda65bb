//! Namespaces: the fingerprint of everything that makes KV incompatible.

use serde::{Deserialize, Serialize};
use std::fmt;

use crate::error::{Error, Result};

/// Element type of the KV tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Dtype {
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
    /// IEEE single precision.
    F32,
    /// 8-bit float, e4m3.
    Fp8E4m3,
    /// 8-bit float, e5m2.
    Fp8E5m2,
}

impl Dtype {
    /// Every dtype, for tables and round-trip tests.
    pub const ALL: [Dtype; 5] = [Self::F16, Self::Bf16, Self::F32, Self::Fp8E4m3, Self::Fp8E5m2];

    /// The name configurations and the wire use (serde's spelling too).
    pub const fn name(self) -> &'static str {
        match self {
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::F32 => "f32",
            Self::Fp8E4m3 => "fp8e4m3",
            Self::Fp8E5m2 => "fp8e5m2",
        }
    }

    /// The dtype named `name`, the inverse of [`Dtype::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Bytes per element.
    pub fn size_bytes(self) -> u64 {
        match self {
            Self::F16 | Self::Bf16 => 2,
            Self::F32 => 4,
            Self::Fp8E4m3 | Self::Fp8E5m2 => 1,
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::F32 => "f32",
            Self::Fp8E4m3 => "fp8e4m3",
            Self::Fp8E5m2 => "fp8e5m2",
        }
    }
}

/// Whether a layer stores separate K and V tensors or one latent (MLA).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum KvKind {
    /// Separate key and value tensors per layer.
    Kv,
    /// One compressed latent per layer (DeepSeek-style multi-head latent attention).
    Mla,
}

impl KvKind {
    /// Every kind, for tables and round-trip tests.
    pub const ALL: [KvKind; 2] = [Self::Kv, Self::Mla];

    /// The name configurations and the wire use (serde's spelling too).
    pub const fn name(self) -> &'static str {
        match self {
            Self::Kv => "kv",
            Self::Mla => "mla",
        }
    }

    /// The kind named `name`, the inverse of [`KvKind::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// The shape of one kvtier block: `block_tokens` tokens across all layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KvLayout {
    /// Attention layers held by this rank.
    pub num_layers: u32,
    /// KV heads held by this rank (1 for MLA).
    pub kv_heads: u32,
    /// Elements per head (for MLA, the latent plus rope dimension).
    pub head_dim: u32,
    /// Tokens per kvtier block.
    pub block_tokens: u32,
    /// K and V, or one latent.
    pub kind: KvKind,
    /// Element type.
    pub dtype: Dtype,
}

impl KvLayout {
    /// Bytes of one block: tokens × layers × (K and V) × heads × head_dim × element.
    pub fn block_bytes(&self) -> u64 {
        let planes = match self.kind {
            KvKind::Kv => 2,
            KvKind::Mla => 1,
        };
        u64::from(self.block_tokens)
            * u64::from(self.num_layers)
            * planes
            * u64::from(self.kv_heads)
            * u64::from(self.head_dim)
            * self.dtype.size_bytes()
    }

    fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("num_layers", self.num_layers),
            ("kv_heads", self.kv_heads),
            ("head_dim", self.head_dim),
            ("block_tokens", self.block_tokens),
        ] {
            if v == 0 {
                return Err(Error::invalid(format!("layout field {name} must be > 0")));
            }
        }
        Ok(())
    }
}

/// Everything that makes two KV blocks incompatible. Two engines share
/// blocks only when all of these are equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Namespace {
    /// Model id, e.g. `meta-llama/Llama-3.1-8B-Instruct`.
    pub model_id: String,
    /// Model revision (commit or tag); empty when unknown.
    #[serde(default)]
    pub revision: String,
    /// Block shape and element type.
    pub layout: KvLayout,
    /// Tensor-parallel rank of the engine worker that owns these blocks.
    #[serde(default)]
    pub tp_rank: u32,
    /// Tensor-parallel world size.
    #[serde(default = "one")]
    pub tp_size: u32,
    /// The user's cache salt (vLLM `cache_salt`), if any.
    #[serde(default)]
    pub salt: Option<String>,
    /// The LoRA adapter applied, if any.
    #[serde(default)]
    pub lora: Option<String>,
}

fn one() -> u32 {
    1
}

/// The 128-bit fingerprint of a [`Namespace`]; the root of every key in it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
pub struct NamespaceId(pub u128);

impl fmt::Debug for NamespaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NamespaceId({:032x})", self.0)
    }
}

impl fmt::Display for NamespaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl Namespace {
    /// The namespace of `model_id` with `layout`, for TP rank 0 of 1, with
    /// no revision, salt or LoRA adapter: set the fields for the rest.
    pub fn new(model_id: impl Into<String>, layout: KvLayout) -> Self {
        Self {
            model_id: model_id.into(),
            revision: String::new(),
            layout,
            tp_rank: 0,
            tp_size: 1,
            salt: None,
            lora: None,
        }
    }

    /// The namespace of the checkpoints of `group` (a training job, or
    /// "default") in chunks of at most `chunk_bytes`.
    ///
    /// Checkpoint chunks are not KV: the layout only fixes the largest
    /// block, as one plane of `chunk_bytes` one-byte elements, and the
    /// model id keeps these namespaces apart from every model's.
    pub fn checkpoints(group: &str, chunk_bytes: u32) -> Self {
        Self {
            model_id: format!("kvtier:checkpoints:{group}"),
            revision: String::new(),
            layout: KvLayout {
                num_layers: 1,
                kv_heads: 1,
                head_dim: chunk_bytes,
                block_tokens: 1,
                kind: KvKind::Mla,
                dtype: Dtype::Fp8E4m3,
            },
            tp_rank: 0,
            tp_size: 1,
            salt: None,
            lora: None,
        }
    }

    /// Whether blocks of this namespace are files, not KV: checkpoint
    /// chunks and kvtierd's S3 objects, whose writes are acknowledged only
    /// once on disk (`BlockManager::store_one_durable`), while KV blocks
    /// are a cache.
    pub fn holds_files(&self) -> bool {
        self.model_id.starts_with("kvtier:checkpoints:") || self.model_id.starts_with("kvtier:s3:")
    }

    /// Checks the fields a block manager relies on.
    pub fn validate(&self) -> Result<()> {
        if self.model_id.is_empty() {
            return Err(Error::invalid("namespace model_id must not be empty"));
        }
        if self.tp_size == 0 || self.tp_rank >= self.tp_size {
            return Err(Error::invalid(format!(
                "namespace tp_rank {} must be below tp_size {}",
                self.tp_rank, self.tp_size
            )));
        }
        self.layout.validate()
    }

    /// Bytes of one block of this namespace.
    pub fn block_bytes(&self) -> u64 {
        self.layout.block_bytes()
    }

    /// The fingerprint: xxh3-128 of a versioned, length-prefixed encoding of
    /// every field, so that no two different namespaces encode the same.
    pub fn id(&self) -> NamespaceId {
        let mut enc = Enc(Vec::with_capacity(256));
        enc.field(b"kvtier-namespace-v1");
        enc.field(self.model_id.as_bytes());
        enc.field(self.revision.as_bytes());
        enc.field(self.layout.dtype.tag().as_bytes());
        enc.field(match self.layout.kind {
            KvKind::Kv => b"kv",
            KvKind::Mla => b"mla",
        });
        for v in [
            self.layout.num_layers,
            self.layout.kv_heads,
            self.layout.head_dim,
            self.layout.block_tokens,
            self.tp_rank,
            self.tp_size,
        ] {
            enc.field(&v.to_le_bytes());
        }
        enc.opt(self.salt.as_deref());
        enc.opt(self.lora.as_deref());
        NamespaceId(xxhash_rust::xxh3::xxh3_128(&enc.0))
    }
}

struct Enc(Vec<u8>);

impl Enc {
    fn field(&mut self, b: &[u8]) {
        self.0.extend_from_slice(&(b.len() as u32).to_le_bytes());
        self.0.extend_from_slice(b);
    }

    fn opt(&mut self, s: Option<&str>) {
        match s {
            None => self.0.push(0),
            Some(s) => {
                self.0.push(1);
                self.field(s.as_bytes());
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn llama() -> Namespace {
        Namespace {
            model_id: "meta-llama/Llama-3.1-8B-Instruct".into(),
            revision: "0e9e39f".into(),
            layout: KvLayout {
                num_layers: 32,
                kv_heads: 8,
                head_dim: 128,
                block_tokens: 16,
                kind: KvKind::Kv,
                dtype: Dtype::Bf16,
            },
            tp_rank: 0,
            tp_size: 1,
            salt: None,
            lora: None,
        }
    }

    #[test]
    fn block_bytes_of_llama_8b() {
        // 16 tokens * 32 layers * 2 (K,V) * 8 heads * 128 dims * 2 bytes.
        assert_eq!(llama().block_bytes(), 2 * 1024 * 1024);
    }

    #[test]
    fn namespace_id_vector_is_pinned() {
        // Computed independently in Python from the documented encoding.
        assert_eq!(llama().id().to_string(), "7f8521b84030135493bf2ff4d4a13c57");
    }

    #[test]
    fn every_field_changes_the_id() {
        let base = llama();
        let id = base.id();
        let mut variants = Vec::new();
        let mut v = base.clone();
        v.model_id.push('x');
        variants.push(v);
        let mut v = base.clone();
        v.revision = "other".into();
        variants.push(v);
        let mut v = base.clone();
        v.layout.dtype = Dtype::F16;
        variants.push(v);
        let mut v = base.clone();
        v.layout.kind = KvKind::Mla;
        variants.push(v);
        let mut v = base.clone();
        v.layout.num_layers += 1;
        variants.push(v);
        let mut v = base.clone();
        v.layout.kv_heads += 1;
        variants.push(v);
        let mut v = base.clone();
        v.layout.head_dim += 1;
        variants.push(v);
        let mut v = base.clone();
        v.layout.block_tokens += 1;
        variants.push(v);
        let mut v = base.clone();
        v.tp_size = 2;
        variants.push(v.clone());
        v.tp_rank = 1;
        variants.push(v);
        let mut v = base.clone();
        v.salt = Some(String::new());
        variants.push(v);
        let mut v = base.clone();
        v.lora = Some("adapter".into());
        variants.push(v);
        // A salt and a LoRA of the same text must not collide.
        let mut v = base.clone();
        v.salt = Some("adapter".into());
        variants.push(v);
        let mut ids: Vec<_> = variants.iter().map(Namespace::id).collect();
        assert!(ids.iter().all(|x| *x != id));
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), variants.len());
    }

    #[test]
    fn invalid_namespaces_are_refused() {
        let mut v = llama();
        v.tp_rank = 1;
        assert!(v.validate().is_err());
        let mut v = llama();
        v.layout.head_dim = 0;
        let e = v.validate().unwrap_err();
        assert!(e.to_string().contains("head_dim"), "{e}");
        let mut v = llama();
        v.model_id.clear();
        assert!(v.validate().is_err());
        assert!(llama().validate().is_ok());
    }

    #[test]
    fn dtype_and_kind_names_round_trip_and_match_serde() {
        for d in Dtype::ALL {
            assert_eq!(Dtype::from_name(d.name()), Some(d));
            assert_eq!(serde_json::to_value(d).unwrap(), d.name());
        }
        for k in KvKind::ALL {
            assert_eq!(KvKind::from_name(k.name()), Some(k));
            assert_eq!(serde_json::to_value(k).unwrap(), k.name());
        }
        assert_eq!(Dtype::from_name("f64"), None);
    }
}
