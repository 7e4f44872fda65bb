//! Conditional requests: `If-Match`, `If-None-Match`, `If-Modified-Since`
//! and `If-Unmodified-Since`, evaluated for reads as RFC 9110 orders them
//! (which is what S3 documents), and for writes as S3's conditional writes
//! behave.

use std::time::SystemTime;

use http::HeaderMap;

use crate::error::{Code, S3Error};
use crate::time::{parse_http_date, whole_secs};
use crate::xml::input::unquote;

/// An ETag condition: `*` or a list of ETags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EtagCondition {
    Any,
    /// The ETags, quotes and any `W/` removed.
    Tags(Vec<String>),
}

impl EtagCondition {
    fn parse(text: &str) -> EtagCondition {
        if text.trim() == "*" {
            return EtagCondition::Any;
        }
        let tags = text
            .split(',')
            .map(|t| {
                let t = t.trim();
                unquote(t.strip_prefix("W/").unwrap_or(t)).to_owned()
            })
            .filter(|t| !t.is_empty())
            .collect();
        EtagCondition::Tags(tags)
    }

    /// Whether an object with `etag` (quoted or not) matches.
    pub fn matches(&self, etag: &str) -> bool {
        match self {
            EtagCondition::Any => true,
            EtagCondition::Tags(tags) => {
                let etag = unquote(etag.trim());
                tags.iter().any(|t| t == etag)
            }
        }
    }
}

/// The conditional headers of a request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Conditions {
    pub if_match: Option<EtagCondition>,
    pub if_none_match: Option<EtagCondition>,
    /// Dates that do not parse are ignored, as RFC 9110 says.
    pub if_modified_since: Option<SystemTime>,
    pub if_unmodified_since: Option<SystemTime>,
}

impl Conditions {
    pub fn from_headers(headers: &HeaderMap) -> Conditions {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        Conditions {
            if_match: text("if-match").map(EtagCondition::parse),
            if_none_match: text("if-none-match").map(EtagCondition::parse),
            if_modified_since: text("if-modified-since").and_then(parse_http_date),
            if_unmodified_since: text("if-unmodified-since").and_then(parse_http_date),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Conditions::default()
    }

    /// Evaluates the conditions of a GET or HEAD against the object's ETag
    /// and modification time, in RFC 9110's order: a false `If-Match` is
    /// `PreconditionFailed`; without `If-Match`, a false
    /// `If-Unmodified-Since` is too; then a false `If-None-Match` is
    /// `NotModified` (304); without `If-None-Match`, a false
    /// `If-Modified-Since` is too. So a true `If-Match` overrides a false
    /// `If-Unmodified-Since`, and a false `If-None-Match` a true
    /// `If-Modified-Since`, as S3 documents.
    pub fn check_read(&self, etag: &str, last_modified: SystemTime) -> Result<(), S3Error> {
        let modified = whole_secs(last_modified);
        match (&self.if_match, self.if_unmodified_since) {
            (Some(cond), _) if !cond.matches(etag) => {
                return Err(S3Error::from_code(Code::PreconditionFailed).with_detail("Condition", "If-Match"));
            }
            (None, Some(since)) if modified > since => {
                return Err(
                    S3Error::from_code(Code::PreconditionFailed).with_detail("Condition", "If-Unmodified-Since")
                );
            }
            _ => {}
        }
        match (&self.if_none_match, self.if_modified_since) {
            (Some(cond), _) if cond.matches(etag) => Err(S3Error::from_code(Code::NotModified)),
            (None, Some(since)) if modified <= since => Err(S3Error::from_code(Code::NotModified)),
            _ => Ok(()),
        }
    }

    /// Evaluates the conditions of a PutObject or CompleteMultipartUpload
    /// against the current object's ETag (`None`: no object), as S3 does:
    /// `If-None-Match: *` fails with `PreconditionFailed` when the object
    /// exists; `If-Match` fails with `NoSuchKey` (404) when there is no
    /// object and with `PreconditionFailed` when the ETag differs.
    /// `If-None-Match` with ETags and the date conditions are
    /// `NotImplemented` on writes, as they are not S3 conditional writes.
    pub fn check_write(&self, current_etag: Option<&str>) -> Result<(), S3Error> {
        self.check_write_supported()?;
        if let Some(cond) = &self.if_match {
            match current_etag {
                None => return Err(S3Error::from_code(Code::NoSuchKey)),
                Some(etag) if !cond.matches(etag) => {
                    return Err(S3Error::from_code(Code::PreconditionFailed).with_detail("Condition", "If-Match"));
                }
                Some(_) => {}
            }
        }
        if self.if_none_match.is_some() && current_etag.is_some() {
            return Err(S3Error::from_code(Code::PreconditionFailed).with_detail("Condition", "If-None-Match"));
        }
        Ok(())
    }

    /// Whether the conditions are ones a write can carry; call before
    /// reading the body, so a request that can never succeed is refused
    /// first.
    pub fn check_write_supported(&self) -> Result<(), S3Error> {
        if matches!(self.if_none_match, Some(EtagCondition::Tags(_))) {
            return Err(S3Error::new(
                Code::NotImplemented,
                "If-None-Match on a write only takes '*'.",
            ));
        }
        if self.if_modified_since.is_some() || self.if_unmodified_since.is_some() {
            return Err(S3Error::new(
                Code::NotImplemented,
                "If-Modified-Since and If-Unmodified-Since on a write are not implemented.",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::HeaderValue;

    use super::*;
    use crate::time::http_date;

    fn conds(pairs: &[(&'static str, &str)]) -> Conditions {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.insert(*n, HeaderValue::from_str(v).unwrap());
        }
        Conditions::from_headers(&h)
    }

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn read(pairs: &[(&'static str, &str)]) -> Option<Code> {
        // The object: ETag "abc", modified at t(100) plus a fraction.
        conds(pairs)
            .check_read("\"abc\"", t(100) + Duration::from_millis(500))
            .err()
            .map(|e| e.code)
    }

    #[test]
    fn etag_conditions() {
        assert_eq!(read(&[("if-match", "\"abc\"")]), None);
        assert_eq!(read(&[("if-match", "abc")]), None);
        assert_eq!(read(&[("if-match", "\"x\", \"abc\"")]), None);
        assert_eq!(read(&[("if-match", "*")]), None);
        assert_eq!(read(&[("if-match", "\"x\"")]), Some(Code::PreconditionFailed));
        assert_eq!(read(&[("if-none-match", "\"abc\"")]), Some(Code::NotModified));
        assert_eq!(read(&[("if-none-match", "W/\"abc\"")]), Some(Code::NotModified));
        assert_eq!(read(&[("if-none-match", "*")]), Some(Code::NotModified));
        assert_eq!(read(&[("if-none-match", "\"x\"")]), None);
    }

    #[test]
    fn date_conditions_at_second_granularity() {
        let at = |s| http_date(t(s));
        assert_eq!(read(&[("if-modified-since", &at(100))]), Some(Code::NotModified));
        assert_eq!(read(&[("if-modified-since", &at(99))]), None);
        assert_eq!(read(&[("if-unmodified-since", &at(100))]), None);
        assert_eq!(
            read(&[("if-unmodified-since", &at(99))]),
            Some(Code::PreconditionFailed)
        );
        assert_eq!(read(&[("if-modified-since", "not a date")]), None);
    }

    #[test]
    fn the_order_s3_documents() {
        let at = |s| http_date(t(s));
        // If-Match true overrides If-Unmodified-Since false.
        assert_eq!(read(&[("if-match", "\"abc\""), ("if-unmodified-since", &at(0))]), None);
        // If-None-Match false overrides If-Modified-Since true.
        assert_eq!(
            read(&[("if-none-match", "\"abc\""), ("if-modified-since", &at(0))]),
            Some(Code::NotModified)
        );
        // If-None-Match true wins over an If-Modified-Since that says 304.
        assert_eq!(
            read(&[("if-none-match", "\"x\""), ("if-modified-since", &at(200))]),
            None
        );
        // 412 comes before 304.
        assert_eq!(
            read(&[("if-match", "\"x\""), ("if-none-match", "\"abc\"")]),
            Some(Code::PreconditionFailed)
        );
    }

    #[test]
    fn write_conditions() {
        let write = |pairs: &[(&'static str, &str)], current: Option<&str>| {
            conds(pairs).check_write(current).err().map(|e| e.code)
        };
        assert_eq!(write(&[], None), None);
        assert_eq!(write(&[("if-none-match", "*")], None), None);
        assert_eq!(
            write(&[("if-none-match", "*")], Some("\"e\"")),
            Some(Code::PreconditionFailed)
        );
        assert_eq!(write(&[("if-match", "\"e\"")], Some("e")), None);
        assert_eq!(
            write(&[("if-match", "\"e\"")], Some("\"f\"")),
            Some(Code::PreconditionFailed)
        );
        assert_eq!(write(&[("if-match", "\"e\"")], None), Some(Code::NoSuchKey));
        assert_eq!(write(&[("if-match", "*")], None), Some(Code::NoSuchKey));
        assert_eq!(write(&[("if-none-match", "\"e\"")], None), Some(Code::NotImplemented));
        assert_eq!(
            write(&[("if-unmodified-since", &http_date(t(0)))], None),
            Some(Code::NotImplemented)
        );
        assert!(conds(&[]).is_empty());
        assert!(!conds(&[("if-match", "*")]).is_empty());
    }
}
