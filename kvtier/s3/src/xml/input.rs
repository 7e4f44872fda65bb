//! The request documents: CompleteMultipartUpload, Delete and
//! CreateBucketConfiguration, each read strictly and within a size bound.

use super::reader::{Element, Limits, malformed, parse};
use crate::checksum::{Checksum, ChecksumAlgorithm};
use crate::error::{Code, S3Error};
use crate::request::{MAX_KEY_BYTES, MAX_PART_NUMBER};

/// The largest CompleteMultipartUpload body read: 10,000 parts with an ETag
/// and a checksum each fit in well under half of it.
pub const MAX_COMPLETE_BODY_BYTES: usize = 4 << 20;
/// The largest Delete body read: 1,000 keys of 1,024 bytes, escaped.
pub const MAX_DELETE_BODY_BYTES: usize = 8 << 20;
/// The most keys one DeleteObjects request may name, as in S3.
pub const MAX_DELETE_OBJECTS: usize = 1000;
/// The largest CreateBucketConfiguration body read.
pub const MAX_CREATE_BUCKET_BODY_BYTES: usize = 64 << 10;

/// One `<Part>` of CompleteMultipartUpload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompletePart {
    pub part_number: u32,
    /// The ETag as sent, quotes removed.
    pub etag: String,
    /// The part's checksum, if the client sent one.
    pub checksum: Option<Checksum>,
}

/// Reads a CompleteMultipartUpload body: at least one part, part numbers in
/// 1..=10000 and strictly ascending (else `InvalidPartOrder`).
pub fn parse_complete_multipart_upload(body: &[u8]) -> Result<Vec<CompletePart>, S3Error> {
    let limits = Limits {
        max_bytes: MAX_COMPLETE_BODY_BYTES,
        max_depth: 3,
        max_nodes: 8 * MAX_PART_NUMBER as usize,
    };
    let root = parse(body, limits)?;
    expect_container(&root, "CompleteMultipartUpload")?;
    let mut parts = Vec::with_capacity(root.children.len());
    for part in &root.children {
        expect_container(part, "Part")?;
        let mut number = None;
        let mut etag = None;
        let mut checksum = None;
        for field in &part.children {
            let text = field.leaf_text()?;
            match field.name.as_str() {
                "PartNumber" => set_once(&mut number, field, parse_part_number(text)?)?,
                "ETag" => set_once(&mut etag, field, unquote(text.trim()).to_owned())?,
                name => match ChecksumAlgorithm::from_xml_element(name) {
                    Some(algorithm) => {
                        let value = Checksum::from_base64(algorithm, text.trim()).ok_or_else(|| {
                            S3Error::new(Code::InvalidRequest, format!("Value for {name} is invalid."))
                        })?;
                        set_once(&mut checksum, field, value)?;
                    }
                    None => return Err(malformed(format!("unexpected <{name}> in <Part>"))),
                },
            }
        }
        let part_number = number.ok_or_else(|| malformed("a <Part> without <PartNumber>"))?;
        let etag = etag.ok_or_else(|| malformed("a <Part> without <ETag>"))?;
        if let Some(prev) = parts.last().map(|p: &CompletePart| p.part_number)
            && part_number <= prev
        {
            return Err(S3Error::from_code(Code::InvalidPartOrder));
        }
        parts.push(CompletePart {
            part_number,
            etag,
            checksum,
        });
    }
    if parts.is_empty() {
        return Err(malformed("CompleteMultipartUpload lists no parts"));
    }
    Ok(parts)
}

fn parse_part_number(text: &str) -> Result<u32, S3Error> {
    let text = text.trim();
    match text.parse::<u32>() {
        Ok(n) if (1..=MAX_PART_NUMBER).contains(&n) && text.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
        _ => Err(S3Error::new(
            Code::InvalidArgument,
            "Part number must be an integer between 1 and 10000, inclusive",
        )
        .with_detail("ArgumentName", "partNumber")
        .with_detail("ArgumentValue", text)),
    }
}

/// A DeleteObjects request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteObjectsRequest {
    pub quiet: bool,
    pub keys: Vec<String>,
}

/// Reads a Delete body: 1..=1000 `<Object><Key>` entries (an empty key or
/// over 1000 entries is `MalformedXML`, as in S3) and an optional `<Quiet>`.
/// A `<VersionId>` other than `null`, and the conditional-delete elements,
/// are `NotImplemented` rather than ignored.
pub fn parse_delete(body: &[u8]) -> Result<DeleteObjectsRequest, S3Error> {
    let limits = Limits {
        max_bytes: MAX_DELETE_BODY_BYTES,
        max_depth: 3,
        max_nodes: 4 * MAX_DELETE_OBJECTS + 8,
    };
    let root = parse(body, limits)?;
    expect_container(&root, "Delete")?;
    let mut quiet = None;
    let mut keys = Vec::new();
    for child in &root.children {
        match child.name.as_str() {
            "Quiet" => {
                let value = match child.leaf_text()?.trim() {
                    "true" => true,
                    "false" => false,
                    other => return Err(malformed(format!("<Quiet> must be true or false, not '{other}'"))),
                };
                set_once(&mut quiet, child, value)?;
            }
            "Object" => {
                expect_container(child, "Object")?;
                let mut key = None;
                for field in &child.children {
                    let text = field.leaf_text()?;
                    match field.name.as_str() {
                        "Key" => set_once(&mut key, field, text.to_owned())?,
                        "VersionId" if text.trim() == "null" => {}
                        "VersionId" | "ETag" | "LastModifiedTime" | "Size" => {
                            return Err(S3Error::new(
                                Code::NotImplemented,
                                format!("<{}> in a Delete request is not implemented", field.name),
                            ));
                        }
                        name => return Err(malformed(format!("unexpected <{name}> in <Object>"))),
                    }
                }
                let key = key.ok_or_else(|| malformed("an <Object> without <Key>"))?;
                if key.is_empty() {
                    return Err(malformed("an empty <Key>"));
                }
                if key.len() > MAX_KEY_BYTES {
                    return Err(S3Error::from_code(Code::KeyTooLongError).with_detail("Key", key));
                }
                keys.push(key);
                if keys.len() > MAX_DELETE_OBJECTS {
                    return Err(malformed(format!("over {MAX_DELETE_OBJECTS} objects")));
                }
            }
            name => return Err(malformed(format!("unexpected <{name}> in <Delete>"))),
        }
    }
    if keys.is_empty() {
        return Err(malformed("Delete names no objects"));
    }
    Ok(DeleteObjectsRequest {
        quiet: quiet.unwrap_or(false),
        keys,
    })
}

/// Reads an optional CreateBucketConfiguration body and returns its
/// `LocationConstraint`, if any. An empty body is no configuration.
pub fn parse_create_bucket_configuration(body: &[u8]) -> Result<Option<String>, S3Error> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let limits = Limits {
        max_bytes: MAX_CREATE_BUCKET_BODY_BYTES,
        max_depth: 3,
        max_nodes: 16,
    };
    let root = parse(body, limits)?;
    expect_container(&root, "CreateBucketConfiguration")?;
    let mut location = None;
    for child in &root.children {
        match child.name.as_str() {
            "LocationConstraint" => set_once(&mut location, child, child.leaf_text()?.trim().to_owned())?,
            "Location" | "Bucket" | "Tags" => {
                return Err(S3Error::new(
                    Code::NotImplemented,
                    format!("<{}> in CreateBucketConfiguration is not implemented", child.name),
                ));
            }
            name => return Err(malformed(format!("unexpected <{name}> in <CreateBucketConfiguration>"))),
        }
    }
    Ok(location.filter(|l| !l.is_empty()))
}

fn expect_container(element: &Element, name: &str) -> Result<(), S3Error> {
    if element.name != name {
        return Err(malformed(format!("<{name}> expected, found <{}>", element.name)));
    }
    if !element.is_container() {
        return Err(malformed(format!("text directly inside <{name}>")));
    }
    Ok(())
}

fn set_once<T>(slot: &mut Option<T>, field: &Element, value: T) -> Result<(), S3Error> {
    if slot.is_some() {
        return Err(malformed(format!("<{}> given twice", field.name)));
    }
    *slot = Some(value);
    Ok(())
}

/// An ETag without its surrounding double quotes.
pub(crate) fn unquote(etag: &str) -> &str {
    etag.strip_prefix('"').and_then(|e| e.strip_suffix('"')).unwrap_or(etag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_reads_parts_and_checksums() {
        let body = br#"<CompleteMultipartUpload xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
            <Part><PartNumber>1</PartNumber><ETag>"aa"</ETag><ChecksumCRC32>AQIDBA==</ChecksumCRC32></Part>
            <Part><ETag>&quot;bb&quot;</ETag><PartNumber>3</PartNumber></Part>
        </CompleteMultipartUpload>"#;
        let parts = parse_complete_multipart_upload(body).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].etag, "aa");
        assert_eq!(parts[0].checksum.as_ref().unwrap().value, vec![1, 2, 3, 4]);
        assert_eq!((parts[1].part_number, parts[1].etag.as_str()), (3, "bb"));
    }

    #[test]
    fn complete_refuses_bad_bodies_precisely() {
        let code = |body: &str| parse_complete_multipart_upload(body.as_bytes()).unwrap_err().code;
        let part = |n: &str| format!("<Part><PartNumber>{n}</PartNumber><ETag>e</ETag></Part>");
        let doc = |inner: String| format!("<CompleteMultipartUpload>{inner}</CompleteMultipartUpload>");
        assert_eq!(code(&doc(part("2") + &part("1"))), Code::InvalidPartOrder);
        assert_eq!(code(&doc(part("2") + &part("2"))), Code::InvalidPartOrder);
        assert_eq!(code(&doc(part("0"))), Code::InvalidArgument);
        assert_eq!(code(&doc(part("10001"))), Code::InvalidArgument);
        assert_eq!(code(&doc(part("+1"))), Code::InvalidArgument);
        assert_eq!(code(&doc(String::new())), Code::MalformedXML);
        assert_eq!(
            code(&doc("<Part><PartNumber>1</PartNumber></Part>".into())),
            Code::MalformedXML
        );
        assert_eq!(code(&doc("<Part><ETag>e</ETag></Part>".into())), Code::MalformedXML);
        assert_eq!(
            code(&doc("<Part><PartNumber>1</PartNumber><ETag>e</ETag><X/></Part>".into())),
            Code::MalformedXML
        );
        assert_eq!(
            code(&doc(
                "<Part><PartNumber>1</PartNumber><PartNumber>2</PartNumber><ETag>e</ETag></Part>".into()
            )),
            Code::MalformedXML
        );
        assert_eq!(
            code(&doc(
                "<Part><PartNumber>1</PartNumber><ETag>e</ETag><ChecksumSHA256>xx</ChecksumSHA256></Part>".into()
            )),
            Code::InvalidRequest
        );
        assert_eq!(code("<Other/>"), Code::MalformedXML);
        assert_eq!(
            code("<CompleteMultipartUpload>text</CompleteMultipartUpload>"),
            Code::MalformedXML
        );
        let huge = doc(part("1").repeat(MAX_COMPLETE_BODY_BYTES / 40));
        assert_eq!(code(&huge), Code::MalformedXML);
    }

    #[test]
    fn delete_reads_keys_and_quiet() {
        let body = b"<Delete><Quiet>true</Quiet><Object><Key>a/b&amp;c</Key></Object>\
            <Object><Key>d</Key><VersionId>null</VersionId></Object></Delete>";
        let req = parse_delete(body).unwrap();
        assert!(req.quiet);
        assert_eq!(req.keys, vec!["a/b&c".to_owned(), "d".to_owned()]);
        assert!(
            !parse_delete(b"<Delete><Object><Key>x</Key></Object></Delete>")
                .unwrap()
                .quiet
        );
    }

    #[test]
    fn delete_refuses_bad_bodies_precisely() {
        let code = |body: &str| parse_delete(body.as_bytes()).unwrap_err().code;
        let obj = |k: &str| format!("<Object><Key>{k}</Key></Object>");
        assert_eq!(
            code(&format!("<Delete>{}</Delete>", obj("k").repeat(1001))),
            Code::MalformedXML
        );
        assert!(parse_delete(format!("<Delete>{}</Delete>", obj("k").repeat(1000)).as_bytes()).is_ok());
        assert_eq!(code("<Delete></Delete>"), Code::MalformedXML);
        assert_eq!(code(&format!("<Delete>{}</Delete>", obj(""))), Code::MalformedXML);
        assert_eq!(
            code(&format!("<Delete>{}</Delete>", obj(&"k".repeat(1025)))),
            Code::KeyTooLongError
        );
        assert_eq!(
            code("<Delete><Quiet>yes</Quiet><Object><Key>k</Key></Object></Delete>"),
            Code::MalformedXML
        );
        assert_eq!(
            code("<Delete><Object><Key>k</Key><VersionId>v1</VersionId></Object></Delete>"),
            Code::NotImplemented
        );
        assert_eq!(
            code("<Delete><Object><Key>k</Key><ETag>e</ETag></Object></Delete>"),
            Code::NotImplemented
        );
        assert_eq!(
            code("<Delete><Object><Key>k</Key><Bogus/></Object></Delete>"),
            Code::MalformedXML
        );
        assert_eq!(
            code("<Delete><Object><Key>k</Key><Key>j</Key></Object></Delete>"),
            Code::MalformedXML
        );
        assert_eq!(code("<Delete><Object><Key>k</Key></Object>"), Code::MalformedXML);
    }

    #[test]
    fn create_bucket_configuration() {
        assert_eq!(parse_create_bucket_configuration(b"").unwrap(), None);
        assert_eq!(parse_create_bucket_configuration(b" \n").unwrap(), None);
        let body = b"<CreateBucketConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
            <LocationConstraint>eu-west-1</LocationConstraint></CreateBucketConfiguration>";
        assert_eq!(
            parse_create_bucket_configuration(body).unwrap().as_deref(),
            Some("eu-west-1")
        );
        let code = |b: &str| parse_create_bucket_configuration(b.as_bytes()).unwrap_err().code;
        assert_eq!(
            code("<CreateBucketConfiguration><X/></CreateBucketConfiguration>"),
            Code::MalformedXML
        );
        assert_eq!(
            code("<CreateBucketConfiguration><Location/></CreateBucketConfiguration>"),
            Code::NotImplemented
        );
        assert_eq!(code("<Nope/>"), Code::MalformedXML);
    }
}
