//! S3's XML bodies: the response documents kvtier writes ([`build`]) and the
//! request documents it reads ([`input`]) through a small strict reader
//! (`reader`).

pub mod build;
pub mod input;
pub(crate) mod reader;

pub use build::{
    BucketEntry, CompleteResult, DeleteError, DeleteResult, ListPage, ListPartsPage, ListUploadsPage, ObjectEntry,
    Owner, PartEntry, UploadEntry, complete_multipart_upload, copy_object_result, delete_result,
    initiate_multipart_upload, list_buckets, list_multipart_uploads, list_objects, list_parts, location_constraint,
    quote_etag,
};
pub use input::{
    CompletePart, DeleteObjectsRequest, MAX_COMPLETE_BODY_BYTES, MAX_CREATE_BUCKET_BODY_BYTES, MAX_DELETE_BODY_BYTES,
    MAX_DELETE_OBJECTS, parse_complete_multipart_upload, parse_create_bucket_configuration, parse_delete,
};

/// The namespace of every S3 response document.
pub const S3_NAMESPACE: &str = "http://s3.amazonaws.com/doc/2006-03-01/";

/// Appends `text` to `out` escaped for XML text and attribute values.
///
/// Characters XML 1.0 cannot carry at all (control characters other than
/// tab, newline and carriage return) are written as character references,
/// which is what S3 does for keys that hold them; carriage returns are
/// referenced too so that readers do not fold them into newlines.
pub fn escape(text: &str, out: &mut String) {
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\r' => out.push_str("&#13;"),
            c if (c as u32) < 0x20 && c != '\t' && c != '\n' => {
                out.push_str("&#");
                out.push_str(&(c as u32).to_string());
                out.push(';');
            }
            c => out.push(c),
        }
    }
}

/// `text` escaped for XML, as a new string.
pub fn escaped(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    escape(text, &mut out);
    out
}

/// The `encoding-type=url` form of a key or prefix: every byte but the
/// unreserved ones and `/` percent-encoded, so that both `unquote` and
/// `unquote_plus` style decoders (SDKs use either) get the key back.
pub fn url_encode_key(key: &str) -> String {
    crate::sigv4::uri_encode(key, false)
}
