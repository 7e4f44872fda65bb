//! The response documents: each builder takes what the server looked up and
//! returns the whole body.

use std::time::SystemTime;

use super::{S3_NAMESPACE, escape, url_encode_key};
use crate::checksum::Checksum;
use crate::request::{ListObjectsParams, ListPartsParams, ListUploadsParams, ListVersion};
use crate::time::iso8601_ms;

/// A small writer: elements and escaped text, nothing else.
struct Doc(String);

impl Doc {
    fn new(root: &str) -> Doc {
        let mut s = String::with_capacity(512);
        s.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<");
        s.push_str(root);
        s.push_str(" xmlns=\"");
        s.push_str(S3_NAMESPACE);
        s.push_str("\">");
        Doc(s)
    }

    fn open(&mut self, name: &str) {
        self.0.push('<');
        self.0.push_str(name);
        self.0.push('>');
    }

    fn close(&mut self, name: &str) {
        self.0.push_str("</");
        self.0.push_str(name);
        self.0.push('>');
    }

    fn text(&mut self, name: &str, text: &str) {
        self.open(name);
        escape(text, &mut self.0);
        self.close(name);
    }

    fn opt(&mut self, name: &str, text: Option<&str>) {
        if let Some(text) = text {
            self.text(name, text);
        }
    }

    fn num(&mut self, name: &str, n: impl std::fmt::Display) {
        self.text(name, &n.to_string());
    }

    fn flag(&mut self, name: &str, b: bool) {
        self.text(name, if b { "true" } else { "false" });
    }

    fn time(&mut self, name: &str, t: SystemTime) {
        self.text(name, &iso8601_ms(t));
    }

    fn etag(&mut self, etag: &str) {
        self.text("ETag", &quote_etag(etag));
    }

    fn owner(&mut self, tag: &str, owner: &Owner) {
        self.open(tag);
        self.text("ID", &owner.id);
        self.text("DisplayName", &owner.display_name);
        self.close(tag);
    }

    fn checksum(&mut self, checksum: Option<&Checksum>) {
        if let Some(c) = checksum {
            self.text(c.algorithm.xml_element(), &c.to_base64());
        }
    }

    fn finish(mut self, root: &str) -> String {
        self.close(root);
        self.0
    }
}

/// An ETag in the double quotes S3 always writes around it.
pub fn quote_etag(etag: &str) -> String {
    if etag.len() >= 2 && etag.starts_with('"') && etag.ends_with('"') {
        etag.to_owned()
    } else {
        format!("\"{etag}\"")
    }
}

/// The owner of buckets and objects (kvtier has one per access key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub id: String,
    pub display_name: String,
}

/// One bucket of `ListAllMyBucketsResult`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketEntry {
    pub name: String,
    pub creation_date: SystemTime,
}

/// `ListAllMyBucketsResult`, the answer to `GET /`.
pub fn list_buckets(owner: &Owner, buckets: &[BucketEntry]) -> String {
    let mut d = Doc::new("ListAllMyBucketsResult");
    d.owner("Owner", owner);
    d.open("Buckets");
    for b in buckets {
        d.open("Bucket");
        d.text("Name", &b.name);
        d.time("CreationDate", b.creation_date);
        d.close("Bucket");
    }
    d.close("Buckets");
    d.finish("ListAllMyBucketsResult")
}

/// `LocationConstraint`: S3 answers an empty element for us-east-1.
pub fn location_constraint(region: &str) -> String {
    let mut d = Doc::new("LocationConstraint");
    if region != "us-east-1" {
        escape(region, &mut d.0);
    }
    d.finish("LocationConstraint")
}

/// One object of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectEntry {
    pub key: String,
    pub last_modified: SystemTime,
    /// The ETag, quoted or not; it is written quoted.
    pub etag: String,
    pub size_bytes: u64,
}

/// What the server found for one listing request: at most `max_keys`
/// objects and common prefixes together, in key order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListPage {
    pub objects: Vec<ObjectEntry>,
    pub common_prefixes: Vec<String>,
    pub is_truncated: bool,
    /// Where the next page starts: V2's `NextContinuationToken` (see
    /// [`crate::request::continuation_token`]) or V1's `NextMarker` (the last
    /// key or common prefix of this page). Written only when truncated.
    pub next: Option<String>,
}

/// `ListBucketResult` for ListObjects V1 and V2 alike, echoing the request's
/// parameters as S3 does; with `encoding-type=url` keys, prefixes, the
/// delimiter and the markers are URL-encoded.
pub fn list_objects(bucket: &str, params: &ListObjectsParams, page: &ListPage, owner: &Owner) -> String {
    let enc = |s: &str| {
        if params.encoding_url {
            url_encode_key(s)
        } else {
            s.to_owned()
        }
    };
    let mut d = Doc::new("ListBucketResult");
    d.text("Name", bucket);
    d.text("Prefix", &enc(&params.prefix));
    let fetch_owner = match &params.version {
        ListVersion::V1 { marker } => {
            d.text("Marker", &enc(marker));
            if page.is_truncated {
                d.opt("NextMarker", page.next.as_deref().map(enc).as_deref());
            }
            true
        }
        ListVersion::V2 {
            continuation_token,
            start_after,
            fetch_owner,
        } => {
            d.opt("ContinuationToken", continuation_token.as_deref());
            if page.is_truncated {
                d.opt("NextContinuationToken", page.next.as_deref());
            }
            d.opt("StartAfter", start_after.as_deref().map(enc).as_deref());
            d.num("KeyCount", page.objects.len() + page.common_prefixes.len());
            *fetch_owner
        }
    };
    d.num("MaxKeys", params.max_keys);
    d.opt("Delimiter", params.delimiter.as_deref().map(enc).as_deref());
    if params.encoding_url {
        d.text("EncodingType", "url");
    }
    d.flag("IsTruncated", page.is_truncated);
    for o in &page.objects {
        d.open("Contents");
        d.text("Key", &enc(&o.key));
        d.time("LastModified", o.last_modified);
        d.etag(&o.etag);
        d.num("Size", o.size_bytes);
        if fetch_owner {
            d.owner("Owner", owner);
        }
        d.text("StorageClass", "STANDARD");
        d.close("Contents");
    }
    for p in &page.common_prefixes {
        d.open("CommonPrefixes");
        d.text("Prefix", &enc(p));
        d.close("CommonPrefixes");
    }
    d.finish("ListBucketResult")
}

/// `CopyObjectResult`, the answer to CopyObject.
pub fn copy_object_result(etag: &str, last_modified: SystemTime) -> String {
    let mut d = Doc::new("CopyObjectResult");
    d.etag(etag);
    d.time("LastModified", last_modified);
    d.finish("CopyObjectResult")
}

/// `InitiateMultipartUploadResult`, the answer to CreateMultipartUpload.
pub fn initiate_multipart_upload(bucket: &str, key: &str, upload_id: &str) -> String {
    let mut d = Doc::new("InitiateMultipartUploadResult");
    d.text("Bucket", bucket);
    d.text("Key", key);
    d.text("UploadId", upload_id);
    d.finish("InitiateMultipartUploadResult")
}

/// What CompleteMultipartUpload made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompleteResult {
    /// The object's URL as the client addressed it.
    pub location: String,
    pub bucket: String,
    pub key: String,
    /// The multipart ETag (`hex-N`), quoted or not.
    pub etag: String,
    /// The composite checksum, when the upload had an algorithm.
    pub checksum: Option<Checksum>,
}

/// `CompleteMultipartUploadResult`.
pub fn complete_multipart_upload(result: &CompleteResult) -> String {
    let mut d = Doc::new("CompleteMultipartUploadResult");
    d.text("Location", &result.location);
    d.text("Bucket", &result.bucket);
    d.text("Key", &result.key);
    d.etag(&result.etag);
    d.checksum(result.checksum.as_ref());
    d.finish("CompleteMultipartUploadResult")
}

/// A key DeleteObjects could not delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteError {
    pub key: String,
    pub code: crate::error::Code,
    pub message: String,
}

/// The outcome of DeleteObjects: the deleted keys (absent keys count as
/// deleted, as in S3) and the failures.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeleteResult {
    pub deleted: Vec<String>,
    pub errors: Vec<DeleteError>,
}

/// `DeleteResult`; in quiet mode only the errors are listed.
pub fn delete_result(result: &DeleteResult, quiet: bool) -> String {
    let mut d = Doc::new("DeleteResult");
    if !quiet {
        for key in &result.deleted {
            d.open("Deleted");
            d.text("Key", key);
            d.close("Deleted");
        }
    }
    for e in &result.errors {
        d.open("Error");
        d.text("Key", &e.key);
        d.text("Code", e.code.as_str());
        d.text("Message", &e.message);
        d.close("Error");
    }
    d.finish("DeleteResult")
}

/// One uploaded part of a ListParts page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartEntry {
    pub part_number: u32,
    pub last_modified: SystemTime,
    pub etag: String,
    pub size_bytes: u64,
    pub checksum: Option<Checksum>,
}

/// What the server found for a ListParts request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListPartsPage {
    pub parts: Vec<PartEntry>,
    pub is_truncated: bool,
}

/// `ListPartsResult`.
pub fn list_parts(
    bucket: &str,
    key: &str,
    upload_id: &str,
    params: &ListPartsParams,
    page: &ListPartsPage,
    owner: &Owner,
) -> String {
    let mut d = Doc::new("ListPartsResult");
    d.text("Bucket", bucket);
    d.text("Key", key);
    d.text("UploadId", upload_id);
    d.num("PartNumberMarker", params.part_number_marker);
    if let Some(last) = page.parts.last() {
        d.num("NextPartNumberMarker", last.part_number);
    }
    d.num("MaxParts", params.max_parts);
    d.flag("IsTruncated", page.is_truncated);
    for p in &page.parts {
        d.open("Part");
        d.num("PartNumber", p.part_number);
        d.time("LastModified", p.last_modified);
        d.etag(&p.etag);
        d.num("Size", p.size_bytes);
        d.checksum(p.checksum.as_ref());
        d.close("Part");
    }
    d.owner("Initiator", owner);
    d.owner("Owner", owner);
    d.text("StorageClass", "STANDARD");
    d.finish("ListPartsResult")
}

/// One in-progress upload of a ListMultipartUploads page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadEntry {
    pub key: String,
    pub upload_id: String,
    pub initiated: SystemTime,
}

/// What the server found for a ListMultipartUploads request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListUploadsPage {
    pub uploads: Vec<UploadEntry>,
    pub common_prefixes: Vec<String>,
    pub is_truncated: bool,
}

/// `ListMultipartUploadsResult`.
pub fn list_multipart_uploads(
    bucket: &str,
    params: &ListUploadsParams,
    page: &ListUploadsPage,
    owner: &Owner,
) -> String {
    let enc = |s: &str| {
        if params.encoding_url {
            url_encode_key(s)
        } else {
            s.to_owned()
        }
    };
    let mut d = Doc::new("ListMultipartUploadsResult");
    d.text("Bucket", bucket);
    d.text("KeyMarker", &enc(&params.key_marker));
    d.text("UploadIdMarker", &params.upload_id_marker);
    if page.is_truncated
        && let Some(last) = page.uploads.last()
    {
        d.text("NextKeyMarker", &enc(&last.key));
        d.text("NextUploadIdMarker", &last.upload_id);
    }
    d.text("Prefix", &enc(&params.prefix));
    d.opt("Delimiter", params.delimiter.as_deref().map(enc).as_deref());
    d.num("MaxUploads", params.max_uploads);
    if params.encoding_url {
        d.text("EncodingType", "url");
    }
    d.flag("IsTruncated", page.is_truncated);
    for u in &page.uploads {
        d.open("Upload");
        d.text("Key", &enc(&u.key));
        d.text("UploadId", &u.upload_id);
        d.owner("Initiator", owner);
        d.owner("Owner", owner);
        d.text("StorageClass", "STANDARD");
        d.time("Initiated", u.initiated);
        d.close("Upload");
    }
    for p in &page.common_prefixes {
        d.open("CommonPrefixes");
        d.text("Prefix", &enc(p));
        d.close("CommonPrefixes");
    }
    d.finish("ListMultipartUploadsResult")
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::checksum::ChecksumAlgorithm;
    use crate::error::Code;

    fn owner() -> Owner {
        Owner {
            id: "kv".into(),
            display_name: "kvtier".into(),
        }
    }

    fn t() -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(1_369_353_600_250)
    }

    fn body(doc: &str) -> &str {
        let start = doc.find('>').unwrap() + 1;
        let start = start + doc[start..].find('>').unwrap() + 1;
        &doc[start..]
    }

    #[test]
    fn list_buckets_document() {
        let doc = list_buckets(
            &owner(),
            &[BucketEntry {
                name: "a&b".into(),
                creation_date: t(),
            }],
        );
        assert!(doc.starts_with(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<ListAllMyBucketsResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">"
        ));
        assert_eq!(
            body(&doc),
            "<Owner><ID>kv</ID><DisplayName>kvtier</DisplayName></Owner><Buckets><Bucket><Name>a&amp;b</Name>\
             <CreationDate>2013-05-24T00:00:00.250Z</CreationDate></Bucket></Buckets></ListAllMyBucketsResult>"
        );
    }

    #[test]
    fn list_objects_v2_with_url_encoding() {
        let params = ListObjectsParams {
            prefix: "dir/a b".into(),
            delimiter: Some("/".into()),
            max_keys: 2,
            encoding_url: true,
            version: ListVersion::V2 {
                continuation_token: Some("tok".into()),
                start_after: None,
                fetch_owner: false,
            },
        };
        let page = ListPage {
            objects: vec![ObjectEntry {
                key: "dir/a b+c".into(),
                last_modified: t(),
                etag: "abc".into(),
                size_bytes: 3,
            }],
            common_prefixes: vec!["dir/a b/".into()],
            is_truncated: true,
            next: Some("next".into()),
        };
        assert_eq!(
            body(&list_objects("bk", &params, &page, &owner())),
            "<Name>bk</Name><Prefix>dir/a%20b</Prefix><ContinuationToken>tok</ContinuationToken>\
             <NextContinuationToken>next</NextContinuationToken><KeyCount>2</KeyCount><MaxKeys>2</MaxKeys>\
             <Delimiter>/</Delimiter><EncodingType>url</EncodingType><IsTruncated>true</IsTruncated>\
             <Contents><Key>dir/a%20b%2Bc</Key><LastModified>2013-05-24T00:00:00.250Z</LastModified>\
             <ETag>&quot;abc&quot;</ETag><Size>3</Size><StorageClass>STANDARD</StorageClass></Contents>\
             <CommonPrefixes><Prefix>dir/a%20b/</Prefix></CommonPrefixes></ListBucketResult>"
        );
    }

    #[test]
    fn list_objects_v1_has_marker_and_owner() {
        let params = ListObjectsParams {
            prefix: String::new(),
            delimiter: None,
            max_keys: 1000,
            encoding_url: false,
            version: ListVersion::V1 { marker: "m<".into() },
        };
        let page = ListPage {
            objects: vec![ObjectEntry {
                key: "k".into(),
                last_modified: t(),
                etag: "\"e\"".into(),
                size_bytes: 0,
            }],
            common_prefixes: vec![],
            is_truncated: false,
            next: Some("ignored when not truncated".into()),
        };
        assert_eq!(
            body(&list_objects("bk", &params, &page, &owner())),
            "<Name>bk</Name><Prefix></Prefix><Marker>m&lt;</Marker><MaxKeys>1000</MaxKeys>\
             <IsTruncated>false</IsTruncated><Contents><Key>k</Key>\
             <LastModified>2013-05-24T00:00:00.250Z</LastModified><ETag>&quot;e&quot;</ETag><Size>0</Size>\
             <Owner><ID>kv</ID><DisplayName>kvtier</DisplayName></Owner><StorageClass>STANDARD</StorageClass>\
             </Contents></ListBucketResult>"
        );
    }

    #[test]
    fn multipart_documents() {
        assert_eq!(
            body(&initiate_multipart_upload("b", "k&", "u1")),
            "<Bucket>b</Bucket><Key>k&amp;</Key><UploadId>u1</UploadId></InitiateMultipartUploadResult>"
        );
        let checksum = Checksum {
            algorithm: ChecksumAlgorithm::Crc32,
            value: vec![1, 2, 3, 4],
        };
        let done = CompleteResult {
            location: "http://h/b/k".into(),
            bucket: "b".into(),
            key: "k".into(),
            etag: "x-2".into(),
            checksum: Some(checksum.clone()),
        };
        assert_eq!(
            body(&complete_multipart_upload(&done)),
            "<Location>http://h/b/k</Location><Bucket>b</Bucket><Key>k</Key><ETag>&quot;x-2&quot;</ETag>\
             <ChecksumCRC32>AQIDBA==</ChecksumCRC32></CompleteMultipartUploadResult>"
        );
        let params = ListPartsParams {
            max_parts: 1,
            part_number_marker: 0,
        };
        let page = ListPartsPage {
            parts: vec![PartEntry {
                part_number: 1,
                last_modified: t(),
                etag: "p".into(),
                size_bytes: 5,
                checksum: Some(checksum),
            }],
            is_truncated: true,
        };
        let doc = list_parts("b", "k", "u", &params, &page, &owner());
        assert!(doc.contains("<PartNumberMarker>0</PartNumberMarker><NextPartNumberMarker>1</NextPartNumberMarker>"));
        assert!(doc.contains("<Part><PartNumber>1</PartNumber><LastModified>2013-05-24T00:00:00.250Z</LastModified>"));
        assert!(doc.contains("<ChecksumCRC32>AQIDBA==</ChecksumCRC32></Part>"));
        let uploads = ListUploadsPage {
            uploads: vec![UploadEntry {
                key: "k".into(),
                upload_id: "u".into(),
                initiated: t(),
            }],
            common_prefixes: vec![],
            is_truncated: true,
        };
        let doc = list_multipart_uploads("b", &ListUploadsParams::default(), &uploads, &owner());
        assert!(doc.contains("<NextKeyMarker>k</NextKeyMarker><NextUploadIdMarker>u</NextUploadIdMarker>"));
        assert!(doc.contains("<MaxUploads>1000</MaxUploads>"));
    }

    #[test]
    fn delete_result_quiet_lists_only_errors() {
        let result = DeleteResult {
            deleted: vec!["a".into()],
            errors: vec![DeleteError {
                key: "b".into(),
                code: Code::AccessDenied,
                message: "no".into(),
            }],
        };
        let loud = delete_result(&result, false);
        assert!(loud.contains("<Deleted><Key>a</Key></Deleted>"));
        let quiet = delete_result(&result, true);
        assert!(!quiet.contains("<Deleted>"));
        assert!(quiet.contains("<Error><Key>b</Key><Code>AccessDenied</Code><Message>no</Message></Error>"));
    }

    #[test]
    fn location_is_empty_for_us_east_1() {
        assert!(location_constraint("us-east-1").ends_with("\"></LocationConstraint>"));
        assert!(location_constraint("eu-west-1").ends_with(">eu-west-1</LocationConstraint>"));
    }
}
