//! The manifest: what a checkpoint holds, written last, so it commits it.
//!
//! Bytes: magic `KVCKPT01`, the payload's length (u32 LE) and xxh3-64 (u64
//! LE), then the payload (bincode, standard config). A manifest that does
//! not verify is an error, never a partial checkpoint.

use bincode::{Decode, Encode};

use crate::error::{Error, ErrorKind, Result};

const MAGIC: &[u8; 8] = b"KVCKPT01";
const HEADER_BYTES: usize = 20;

/// One chunk of a file: its key (content-addressed) and length.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ChunkRef {
    /// The chunk's block key (`BlockKey.0`).
    pub key: u128,
    /// Bytes in the chunk.
    pub len: u32,
}

/// One file of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct FileEntry {
    /// Path relative to the checkpoint's root, `/`-separated.
    pub path: String,
    /// Bytes.
    pub size: u64,
    /// xxh3-64 of the whole file.
    pub hash: u64,
    /// Its chunks, in order.
    pub chunks: Vec<ChunkRef>,
}

/// A committed checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Manifest {
    /// The checkpoint's name.
    pub name: String,
    /// When it was committed, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// The largest chunk.
    pub chunk_bytes: u32,
    /// Its files, in path order.
    pub files: Vec<FileEntry>,
}

impl Manifest {
    /// Bytes of all files.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// Chunks of all files.
    pub fn chunks(&self) -> usize {
        self.files.iter().map(|f| f.chunks.len()).sum()
    }

    /// The manifest's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let payload = bincode::encode_to_vec(self, bincode::config::standard()).expect("a manifest always encodes");
        let mut out = Vec::with_capacity(HEADER_BYTES + payload.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// Parses and verifies a manifest's bytes.
    pub fn decode(b: &[u8]) -> Result<Self> {
        let bad = |why: &str| Error::new(ErrorKind::ChecksumMismatch, format!("checkpoint manifest: {why}"));
        if b.len() < HEADER_BYTES || &b[..8] != MAGIC {
            return Err(bad("not a manifest (bad magic)"));
        }
        let len = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")) as usize;
        let hash = u64::from_le_bytes(b[12..20].try_into().expect("8 bytes"));
        let payload = &b[HEADER_BYTES..];
        if payload.len() != len {
            return Err(bad("truncated"));
        }
        if xxhash_rust::xxh3::xxh3_64(payload) != hash {
            return Err(bad("checksum mismatch"));
        }
        let (m, used): (Manifest, usize) =
            bincode::decode_from_slice(payload, bincode::config::standard()).map_err(|e| bad(&e.to_string()))?;
        if used != len {
            return Err(bad("trailing bytes"));
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            name: "step-100".into(),
            created_unix_ms: 1,
            chunk_bytes: 1 << 20,
            files: vec![FileEntry {
                path: "model/shard-0.safetensors".into(),
                size: 3,
                hash: 9,
                chunks: vec![ChunkRef { key: 7, len: 3 }],
            }],
        }
    }

    #[test]
    fn round_trips_and_every_byte_matters() {
        let m = sample();
        let b = m.encode();
        assert_eq!(Manifest::decode(&b).unwrap(), m);
        for i in 0..b.len() {
            let mut bad = b.clone();
            bad[i] ^= 0x01;
            assert!(Manifest::decode(&bad).is_err(), "flipping byte {i} went unnoticed");
        }
        assert!(Manifest::decode(&b[..b.len() - 1]).is_err());
    }
}
