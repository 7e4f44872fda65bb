//! Block bytes on the wire: split into messages of at most [`CHUNK_BYTES`],
//! and the one-bit-per-key presence bitmap.

use bytes::Bytes;

use crate::CHUNK_BYTES;

/// `data` as consecutive slices of at most [`CHUNK_BYTES`] (no copy). Empty
/// data gives no slices; see [`pieces_at_least_one`] for streams whose
/// first message must exist.
pub fn pieces(data: &Bytes) -> impl Iterator<Item = Bytes> + '_ {
    (0..data.len())
        .step_by(CHUNK_BYTES)
        .map(move |at| data.slice(at..(at + CHUNK_BYTES).min(data.len())))
}

/// Like [`pieces`], but one empty slice for empty data: for streams whose
/// first message carries the header together with the first bytes.
pub fn pieces_at_least_one(data: &Bytes) -> impl Iterator<Item = Bytes> + '_ {
    let empty = data.is_empty().then(Bytes::new);
    empty.into_iter().chain(pieces(data))
}

/// How many messages [`pieces`] makes of `len` bytes.
pub fn piece_count(len: usize) -> usize {
    len.div_ceil(CHUNK_BYTES)
}

/// `present` as a bitmap, one bit per key, least significant bit first.
pub fn bitmap(present: &[bool]) -> Bytes {
    let mut b = vec![0u8; present.len().div_ceil(8)];
    for (i, p) in present.iter().enumerate() {
        if *p {
            b[i / 8] |= 1 << (i % 8);
        }
    }
    Bytes::from(b)
}

/// The first `n` bits of `b`; `None` when `b` is not `n` bits long.
pub fn from_bitmap(b: &[u8], n: usize) -> Option<Vec<bool>> {
    (b.len() == n.div_ceil(8)).then(|| (0..n).map(|i| b[i / 8] & (1 << (i % 8)) != 0).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_data_in_order_without_gaps() {
        for len in [0, 1, CHUNK_BYTES - 1, CHUNK_BYTES, CHUNK_BYTES + 1, 3 * CHUNK_BYTES + 7] {
            let data = Bytes::from((0..len).map(|i| (i % 251) as u8).collect::<Vec<_>>());
            let p: Vec<Bytes> = pieces(&data).collect();
            assert_eq!(p.len(), piece_count(len), "len {len}");
            assert!(p.iter().all(|s| !s.is_empty() && s.len() <= CHUNK_BYTES), "len {len}");
            assert_eq!(p.concat(), data.to_vec(), "len {len}");
            let q: Vec<Bytes> = pieces_at_least_one(&data).collect();
            assert_eq!(q.len(), piece_count(len).max(1), "len {len}");
            assert_eq!(q.concat(), data.to_vec(), "len {len}");
        }
    }

    #[test]
    fn bitmap_round_trips_and_checks_its_length() {
        for n in [0usize, 1, 7, 8, 9, 64, 65, 100] {
            let present: Vec<bool> = (0..n).map(|i| i % 3 == 0).collect();
            let b = bitmap(&present);
            assert_eq!(b.len(), n.div_ceil(8));
            assert_eq!(from_bitmap(&b, n), Some(present), "n {n}");
        }
        assert_eq!(from_bitmap(&[0xff], 9), None);
        assert_eq!(from_bitmap(&[0xff, 0], 8), None);
    }
}
