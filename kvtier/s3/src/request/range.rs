//! The `Range` header of GetObject, read as S3 reads it.

use crate::error::{Code, S3Error};

/// The byte range a `Range` header asks of an object of `size_bytes`:
/// `Ok(None)` for the whole object, `Ok(Some((first, last)))` with `last`
/// inclusive and within the object.
///
/// As S3: `bytes=a-b` (`b` past the end is cut to the end), `bytes=a-`, and
/// `bytes=-n` (the last `n` bytes, all of them if `n` is larger); a range
/// that starts at or past the end, `bytes=-0`, and any range of an empty
/// object is `InvalidRange` (416). A header that is not a single byte range
/// (another unit, bad syntax, `a > b`, or several ranges, which S3 does not
/// serve) is ignored: the answer is the whole object, as RFC 9110 and S3 do.
pub fn parse_range(header: Option<&str>, size_bytes: u64) -> Result<Option<(u64, u64)>, S3Error> {
    let Some(header) = header else { return Ok(None) };
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let number = |s: &str| -> Option<u64> {
        let s = s.trim();
        (!s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let unsatisfiable = || {
        S3Error::from_code(Code::InvalidRange)
            .with_detail("RangeRequested", header.trim())
            .with_detail("ActualObjectSize", size_bytes.to_string())
    };
    match (first.trim().is_empty(), number(first), number(last)) {
        // bytes=-n: the suffix.
        (true, _, Some(n)) => {
            if n == 0 || size_bytes == 0 {
                return Err(unsatisfiable());
            }
            Ok(Some((size_bytes - n.min(size_bytes), size_bytes - 1)))
        }
        (false, Some(a), last_bytes) => {
            let last = match last_bytes {
                Some(b) if b < a => return Ok(None),
                Some(b) => Some(b),
                None if last.trim().is_empty() => None,
                None => return Ok(None),
            };
            if a >= size_bytes {
                return Err(unsatisfiable());
            }
            Ok(Some((a, last.map_or(size_bytes - 1, |b| b.min(size_bytes - 1)))))
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn satisfiable_ranges() {
        let r = |h: &str| parse_range(Some(h), 100).unwrap();
        assert_eq!(r("bytes=0-9"), Some((0, 9)));
        assert_eq!(r("bytes=90-200"), Some((90, 99)));
        assert_eq!(r("bytes=99-"), Some((99, 99)));
        assert_eq!(r("bytes=-10"), Some((90, 99)));
        assert_eq!(r("bytes=-1000"), Some((0, 99)));
        assert_eq!(r(" bytes=5-5 "), Some((5, 5)));
        assert_eq!(parse_range(None, 100).unwrap(), None);
    }

    #[test]
    fn ignored_ranges_serve_the_whole_object() {
        for h in [
            "items=0-1",
            "bytes=0-1,5-6",
            "bytes=5-1",
            "bytes=abc",
            "bytes=a-5",
            "bytes=-",
            "bytes=1-x",
            "bytes=+1-2",
            "0-1",
        ] {
            assert_eq!(parse_range(Some(h), 100).unwrap(), None, "{h}");
        }
    }

    #[test]
    fn unsatisfiable_ranges_are_invalid_range() {
        for (h, size) in [
            ("bytes=100-", 100),
            ("bytes=100-200", 100),
            ("bytes=-0", 100),
            ("bytes=0-", 0),
            ("bytes=-5", 0),
        ] {
            let err = parse_range(Some(h), size).unwrap_err();
            assert_eq!(err.code, Code::InvalidRange, "{h}");
            assert_eq!(err.status().as_u16(), 416);
            assert_eq!(err.detail("ActualObjectSize"), Some(size.to_string().as_str()));
        }
    }
}
