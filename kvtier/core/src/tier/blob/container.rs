//! Creating a blob container with one Shared Key-signed REST call.

use base64::Engine;
use hmac::{Hmac, Mac};

use crate::error::{Error, ErrorKind, Result};

/// The storage API version the signed requests use.
const API_VERSION: &str = "2021-08-06";

/// An account name and its base64 access key.
#[derive(Clone)]
pub struct SharedKey {
    /// Storage account name.
    pub account: String,
    /// Base64 account key.
    pub key: String,
}

impl std::fmt::Debug for SharedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("SharedKey")
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

/// Creates `container` under `endpoint` (e.g.
/// `https://ACCOUNT.blob.core.windows.net`, or Azurite's path-style
/// `http://127.0.0.1:PORT/ACCOUNT`). Answers whether it was created (false:
/// it existed). Wrong credentials are a [`ErrorKind::Config`] error that says
/// so; an unreachable endpoint is [`ErrorKind::Unavailable`], a 429
/// [`ErrorKind::Throttled`], a 5xx [`ErrorKind::Unavailable`].
pub async fn create_container(endpoint: &str, cred: &SharedKey, container: &str) -> Result<bool> {
    if !(3..=63).contains(&container.len())
        || !container
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(Error::invalid(format!(
            "container name {container:?}: 3 to 63 lowercase letters, digits and hyphens"
        )));
    }
    let base = endpoint.trim_end_matches('/');
    let url = reqwest::Url::parse(&format!("{base}/{container}?restype=container"))
        .map_err(|e| Error::config(format!("blob endpoint {endpoint:?}: {e}")))?;
    let date = httpdate::fmt_http_date(std::time::SystemTime::now());
    // Shared Key: VERB and eleven empty standard headers, the x-ms headers,
    // then the resource as account + URL path (path-style URLs repeat the
    // account) and the query parameters.
    let string_to_sign = format!(
        "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{API_VERSION}\n/{}{}\nrestype:container",
        cred.account,
        url.path()
    );
    let key = base64::engine::general_purpose::STANDARD
        .decode(&cred.key)
        .map_err(|_| Error::config(format!("the access key of account {} is not base64", cred.account)))?;
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).expect("HMAC takes keys of any length");
    mac.update(string_to_sign.as_bytes());
    let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let resp = reqwest::Client::new()
        .put(url)
        .header("x-ms-date", &date)
        .header("x-ms-version", API_VERSION)
        .header("Authorization", format!("SharedKey {}:{signature}", cred.account))
        // An explicit empty body: the request carries Content-Length: 0.
        .body(Vec::<u8>::new())
        .send()
        .await
        .map_err(|e| {
            let mut msg = format!("blob endpoint {endpoint} unreachable: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            Error::with_source(ErrorKind::Unavailable, msg, e)
        })?;
    match resp.status().as_u16() {
        201 => Ok(true),
        409 => Ok(false),
        403 => Err(Error::config(format!(
            "blob account {}: the credentials were refused (403) creating container {container}",
            cred.account
        ))),
        s => {
            let body = resp.text().await.unwrap_or_default();
            let kind = match s {
                429 => ErrorKind::Throttled,
                500 | 502 | 503 | 504 => ErrorKind::Unavailable,
                _ => ErrorKind::Io,
            };
            Err(Error::new(
                kind,
                format!(
                    "creating container {container}: HTTP {s}: {}",
                    body.chars().take(300).collect::<String>()
                ),
            ))
        }
    }
}
