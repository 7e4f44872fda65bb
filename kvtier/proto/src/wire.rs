//! gRPC messages framed by hand, for the methods that carry block bytes
//! (`Put`, `Get`, `ReplicaPut`, `ReplicaGet`).
//!
//! tonic's codec copies every message twice on its way through: the encoder
//! writes it into one buffer before HTTP/2 sends it, and the decoder
//! gathers each HTTP/2 frame into another before prost reads it. For a
//! small message that costs nothing; for block bytes it was a third of the
//! CPU of a streamed Put or Get. Here the bytes stay where they are:
//!
//! - **Sending**, a message whose only field is a `bytes` field goes out as
//!   two body frames: a few bytes of prefix (the gRPC header, the field's
//!   key and length) made here, then the caller's [`Bytes`] themselves,
//!   which HTTP/2 writes from where they lie ([`bytes_message`]).
//! - **Receiving**, [`MessageReader`] parses the gRPC framing over the
//!   HTTP/2 frames as they arrive, and hands the payload of such a message
//!   on as slices of those frames ([`MessageReader::payload`]): the caller
//!   copies them once, into the buffer they belong in. Any other message
//!   (headers, replies, or a data message some other client encoded with
//!   extra fields) is gathered whole for prost ([`Message::Whole`]).
//!
//! What goes over the wire is the same gRPC and protobuf either way: any
//! gRPC client talks to kvtierd, and this client to any server of the
//! proto. Compressed messages are refused (neither side asks for them).

use bytes::{BufMut, Bytes, BytesMut};
use http::HeaderMap;
use http_body::Frame;
use http_body_util::BodyExt;
use kvtier::ErrorKind;
use std::collections::VecDeque;
use tonic::Status;

use crate::error::status_of;

/// The gRPC prefix of every message: a compressed flag and a big-endian
/// 32-bit length.
pub const GRPC_HEADER_BYTES: usize = 5;

/// The field number of the `bytes data` member in `PutRequest`,
/// `ReplicaPutRequest` and `GetResponse` (the `msg` oneof's second case).
pub const DATA_FIELD: u32 = 2;

/// The longest field key plus length prefix: a varint key of field
/// numbers below 2^11 is 2 bytes at most, a varint length 10.
const MAX_FIELD_PREFIX: usize = 12;

/// The protobuf key of field `field` with wire type LEN (2).
fn len_key(field: u32) -> u64 {
    (u64::from(field) << 3) | 2
}

fn put_varint(b: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        b.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    b.put_u8(v as u8);
}

/// A varint at the start of `b`: its value and length; `None` when `b`
/// ends first or it runs past 10 bytes.
fn get_varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            return Some((v, i + 1));
        }
    }
    None
}

/// The gRPC header of an uncompressed message of `len` bytes.
fn grpc_header(b: &mut BytesMut, len: usize) {
    b.put_u8(0);
    b.put_u32(u32::try_from(len).expect("a message under 4 GiB"));
}

/// The two body frames of a message whose only field is `bytes` field
/// `field` holding `data`: the prefix, then `data` uncopied.
pub fn bytes_message(field: u32, data: Bytes) -> [Bytes; 2] {
    let mut key = BytesMut::with_capacity(MAX_FIELD_PREFIX);
    put_varint(&mut key, len_key(field));
    put_varint(&mut key, data.len() as u64);
    let mut p = BytesMut::with_capacity(GRPC_HEADER_BYTES + key.len());
    grpc_header(&mut p, key.len() + data.len());
    p.put_slice(&key);
    [p.freeze(), data]
}

/// One whole message, framed: for the small ones (headers, replies).
pub fn message(m: &impl prost::Message) -> Bytes {
    let len = m.encoded_len();
    let mut b = BytesMut::with_capacity(GRPC_HEADER_BYTES + len);
    grpc_header(&mut b, len);
    m.encode(&mut b).expect("the buffer holds the message");
    b.freeze()
}

/// An HTTP body of `frames`, then `trailers` if any: what a request or a
/// response made of [`message`] and [`bytes_message`] frames is sent as.
pub fn body(frames: Vec<Bytes>, trailers: Option<HeaderMap>) -> tonic::body::Body {
    let frames = frames
        .into_iter()
        .filter(|f| !f.is_empty())
        .map(Frame::data)
        .chain(trailers.map(Frame::trailers))
        .map(Ok::<_, Status>);
    tonic::body::Body::new(http_body_util::StreamBody::new(tokio_stream::iter(frames)))
}

/// The trailers of a call that succeeded.
pub fn ok_trailers() -> HeaderMap {
    let mut h = HeaderMap::new();
    Status::ok("")
        .add_header(&mut h)
        .expect("an OK status makes valid headers");
    h
}

/// What [`MessageReader::next`] found.
#[derive(Debug)]
pub enum Message {
    /// A message whose only field is the `bytes` field asked for, holding
    /// this many bytes: read them with [`MessageReader::payload`] before
    /// the next message.
    Bytes(usize),
    /// Any other message, whole, for prost.
    Whole(Bytes),
}

/// gRPC messages parsed off an HTTP body as its frames arrive. Memory is
/// bounded by one message's prefix plus the HTTP/2 frames in flight:
/// payloads pass through as slices of those frames.
#[derive(Debug)]
pub struct MessageReader {
    body: tonic::body::Body,
    frames: VecDeque<Bytes>,
    buffered: usize,
    /// Payload bytes of the current [`Message::Bytes`] not read yet.
    unread: usize,
    trailers: Option<HeaderMap>,
    ended: bool,
    max_message_bytes: usize,
    /// The kind of a malformed stream: `InvalidArgument` where the peer is
    /// a client, `Internal` where it is the server.
    malformed: ErrorKind,
}

impl MessageReader {
    /// Reads `body`, refusing messages over `max_message_bytes`; a
    /// malformed stream is an error of kind `malformed`.
    pub fn new(body: tonic::body::Body, max_message_bytes: usize, malformed: ErrorKind) -> Self {
        Self {
            body,
            frames: VecDeque::new(),
            buffered: 0,
            unread: 0,
            trailers: None,
            ended: false,
            max_message_bytes,
            malformed,
        }
    }

    fn bad(&self, msg: impl Into<String>) -> Status {
        status_of(self.malformed, msg)
    }

    /// Pulls the next body frame in; false at the end of the body.
    async fn pull(&mut self) -> Result<bool, Status> {
        while !self.ended {
            match self.body.frame().await {
                None => self.ended = true,
                Some(Err(e)) => return Err(e),
                Some(Ok(f)) => match f.into_data() {
                    Ok(d) if d.is_empty() => {}
                    Ok(d) => {
                        self.buffered += d.len();
                        self.frames.push_back(d);
                        return Ok(true);
                    }
                    Err(f) => {
                        if let Ok(t) = f.into_trailers() {
                            self.trailers.get_or_insert_with(HeaderMap::new).extend(t);
                        }
                    }
                },
            }
        }
        Ok(false)
    }

    /// Buffers at least `n` bytes; false if the body ends first.
    async fn fill(&mut self, n: usize) -> Result<bool, Status> {
        while self.buffered < n {
            if !self.pull().await? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The first `n` buffered bytes (`n` at most the buffered ones), copied
    /// out without consuming them: for prefixes of a few bytes.
    fn peek(&self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n);
        for f in &self.frames {
            let k = (n - out.len()).min(f.len());
            out.extend_from_slice(&f[..k]);
            if out.len() == n {
                break;
            }
        }
        out
    }

    /// Takes `n` buffered bytes: a slice of one frame when they lie in
    /// one, else gathered.
    fn take(&mut self, n: usize) -> Bytes {
        assert!(n <= self.buffered, "take {n} of {} buffered bytes", self.buffered);
        self.buffered -= n;
        let front = self.frames.front_mut().expect("buffered bytes lie in frames");
        if front.len() >= n {
            let out = front.split_to(n);
            if front.is_empty() {
                self.frames.pop_front();
            }
            return out;
        }
        let mut out = BytesMut::with_capacity(n);
        while out.len() < n {
            let f = self.frames.front_mut().expect("buffered bytes lie in frames");
            let k = (n - out.len()).min(f.len());
            out.put_slice(&f.split_to(k));
            if f.is_empty() {
                self.frames.pop_front();
            }
        }
        out.freeze()
    }

    /// The next message; `None` at the end of the body. A
    /// [`Message::Bytes`] payload left unread is skipped first.
    pub async fn next(&mut self, bytes_field: u32) -> Result<Option<Message>, Status> {
        self.next_of(Some(bytes_field)).await
    }

    /// [`MessageReader::next`]; with `bytes_field` `None`, every message
    /// comes whole.
    async fn next_of(&mut self, bytes_field: Option<u32>) -> Result<Option<Message>, Status> {
        if self.unread > 0 {
            self.payload(|_| Ok(())).await?;
        }
        if !self.fill(GRPC_HEADER_BYTES).await? {
            return match self.buffered {
                0 => Ok(None),
                n => Err(self.bad(format!("the body ended inside a message header ({n} of 5 bytes)"))),
            };
        }
        let h = self.peek(GRPC_HEADER_BYTES);
        if h[0] != 0 {
            return Err(status_of(
                ErrorKind::InvalidArgument,
                "a compressed gRPC message: kvtier neither sends nor accepts compression",
            ));
        }
        let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
        if len > self.max_message_bytes {
            return Err(status_of(
                ErrorKind::TooLarge,
                format!(
                    "a message of {len} bytes exceeds the limit of {} bytes",
                    self.max_message_bytes
                ),
            ));
        }
        // A message that is one `bytes` field: key, length, payload.
        let prefix = len.min(MAX_FIELD_PREFIX);
        if !self.fill(GRPC_HEADER_BYTES + prefix).await? {
            return Err(self.bad("the body ended inside a message"));
        }
        let p = self.peek(GRPC_HEADER_BYTES + prefix);
        let p = &p[GRPC_HEADER_BYTES..];
        if let Some(field) = bytes_field
            && let Some((key, k)) = get_varint(p)
            && key == len_key(field)
            && let Some((n, l)) = get_varint(&p[k..])
            && (k + l) as u64 + n == len as u64
        {
            self.take(GRPC_HEADER_BYTES + k + l);
            self.unread = n as usize;
            return Ok(Some(Message::Bytes(n as usize)));
        }
        if !self.fill(GRPC_HEADER_BYTES + len).await? {
            return Err(self.bad(format!("the body ended inside a message of {len} bytes")));
        }
        self.take(GRPC_HEADER_BYTES);
        Ok(Some(Message::Whole(self.take(len))))
    }

    /// The payload of the [`Message::Bytes`] just read, handed to `f` as
    /// slices of the frames it arrived in, in order.
    pub async fn payload(&mut self, mut f: impl FnMut(Bytes) -> Result<(), Status>) -> Result<(), Status> {
        while self.unread > 0 {
            if self.buffered == 0 && !self.pull().await? {
                return Err(self.bad(format!("the body ended {} bytes short of a message", self.unread)));
            }
            let front = self.frames.front().map_or(0, Bytes::len);
            let s = self.take(front.min(self.unread));
            self.unread -= s.len();
            f(s)?;
        }
        Ok(())
    }

    /// The next message decoded as `M`, whatever its fields; `None` at the
    /// end of the body.
    pub async fn decode<M: prost::Message + Default>(&mut self) -> Result<Option<M>, Status> {
        match self.next_of(None).await? {
            None => Ok(None),
            Some(Message::Whole(b)) => M::decode(b)
                .map(Some)
                .map_err(|e| self.bad(format!("a message that does not decode: {e}"))),
            Some(Message::Bytes(_)) => unreachable!("no bytes field was asked for"),
        }
    }

    /// Reads to the end of the body (no more messages expected) and answers
    /// the call's status from its trailers: what a client does last.
    pub async fn finish(&mut self) -> Result<(), Status> {
        if let Some(m) = self.next_of(None).await? {
            return Err(self.bad(format!("a message more than the call answers: {m:?}")));
        }
        match self.trailers.as_ref().and_then(Status::from_header_map) {
            Some(s) if s.code() == tonic::Code::Ok => Ok(()),
            Some(s) => Err(s),
            None => Err(self.bad("the answer ended without a gRPC status")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The frames of `frames` cut at every `cut` bytes, as HTTP/2 might
    /// deliver them.
    fn recut(frames: &[Bytes], cut: usize) -> Vec<Bytes> {
        let all: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied()).collect();
        all.chunks(cut).map(Bytes::copy_from_slice).collect()
    }

    fn reader(frames: Vec<Bytes>, trailers: Option<HeaderMap>) -> MessageReader {
        MessageReader::new(body(frames, trailers), 1 << 20, ErrorKind::InvalidArgument)
    }

    fn put_data(d: &[u8]) -> crate::proto::PutRequest {
        crate::proto::PutRequest {
            msg: Some(crate::proto::put_request::Msg::Data(Bytes::copy_from_slice(d))),
        }
    }

    #[tokio::test]
    async fn frames_parse_back_into_the_messages_prost_encodes_whatever_the_cuts() {
        let header = crate::proto::PutRequest {
            msg: Some(crate::proto::put_request::Msg::Header(crate::proto::PutHeader {
                namespace_id: Bytes::from_static(&[7; 16]),
                keys: vec![Bytes::from_static(&[1; 16]), Bytes::from_static(&[2; 16])],
            })),
        };
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut frames = vec![message(&header)];
        frames.extend(bytes_message(DATA_FIELD, Bytes::from(payload.clone())));
        // An empty data message, and one prost encoded itself.
        frames.extend(bytes_message(DATA_FIELD, Bytes::new()));
        frames.push(message(&put_data(b"tail")));
        // The hand-made frames are what prost makes of the same message.
        let [p, d] = bytes_message(DATA_FIELD, Bytes::from_static(b"abc"));
        assert_eq!([p, d].concat(), message(&put_data(b"abc")).to_vec());
        for cut in [1, 2, 3, 5, 7, 4096, 1 << 20] {
            let mut r = reader(recut(&frames, cut), Some(ok_trailers()));
            let got: crate::proto::PutRequest = match r.next(DATA_FIELD).await.unwrap() {
                Some(Message::Whole(b)) => prost::Message::decode(b).unwrap(),
                other => panic!("cut {cut}: {other:?}"),
            };
            assert_eq!(got, header, "cut {cut}");
            let mut datas = Vec::new();
            while let Some(m) = r.next(DATA_FIELD).await.unwrap() {
                let Message::Bytes(n) = m else {
                    panic!("cut {cut}: {m:?}")
                };
                let mut d = Vec::new();
                r.payload(|s| {
                    d.extend_from_slice(&s);
                    Ok(())
                })
                .await
                .unwrap();
                assert_eq!(d.len(), n, "cut {cut}");
                datas.push(d);
            }
            assert_eq!(datas, vec![payload.clone(), vec![], b"tail".to_vec()], "cut {cut}");
            r.finish().await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_payload_in_one_frame_is_handed_on_without_a_copy() {
        let data = Bytes::from(vec![9u8; 100_000]);
        let mut r = reader(bytes_message(DATA_FIELD, data.clone()).to_vec(), None);
        assert!(matches!(
            r.next(DATA_FIELD).await.unwrap(),
            Some(Message::Bytes(100_000))
        ));
        let mut slices = Vec::new();
        r.payload(|s| {
            slices.push(s);
            Ok(())
        })
        .await
        .unwrap();
        assert_eq!(slices.len(), 1);
        assert_eq!(slices[0].as_ptr(), data.as_ptr(), "the payload was copied");
    }

    #[tokio::test]
    async fn a_data_message_with_other_fields_comes_whole() {
        // A message prost encodes with an unknown field after the data:
        // not one bytes field, so it is handed over whole.
        let mut m = message(&put_data(b"xyz")).to_vec();
        m.extend_from_slice(&[0x18, 0x01]); // field 3, varint 1
        let len = (m.len() - GRPC_HEADER_BYTES) as u32;
        m[1..5].copy_from_slice(&len.to_be_bytes());
        let mut r = reader(vec![Bytes::from(m)], None);
        match r.next(DATA_FIELD).await.unwrap() {
            Some(Message::Whole(b)) => {
                let d: crate::proto::PutRequest = prost::Message::decode(b).unwrap();
                assert_eq!(d, put_data(b"xyz"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn malformed_streams_are_precise_errors() {
        // Truncated header, truncated payload, compressed, oversize.
        let full = message(&put_data(&[1; 64]));
        let cases: Vec<(Vec<Bytes>, ErrorKind, &str)> = vec![
            (
                vec![full.slice(..3)],
                ErrorKind::InvalidArgument,
                "inside a message header",
            ),
            (vec![full.slice(..20)], ErrorKind::InvalidArgument, "short of a message"),
            (
                vec![Bytes::from_static(&[1, 0, 0, 0, 1, 0])],
                ErrorKind::InvalidArgument,
                "compressed",
            ),
            (
                vec![Bytes::from_static(&[0, 0x10, 0, 0, 1])],
                ErrorKind::TooLarge,
                "exceeds the limit",
            ),
        ];
        for (frames, kind, text) in cases {
            let mut r = reader(frames, None);
            let e = match r.next(DATA_FIELD).await {
                Ok(Some(Message::Bytes(_))) => r.payload(|_| Ok(())).await.unwrap_err(),
                Ok(other) => panic!("{text}: {other:?}"),
                Err(e) => e,
            };
            assert_eq!(crate::error::carried_kind(&e), Some(kind), "{text}: {e:?}");
            assert!(e.message().contains(text), "{text}: {e:?}");
        }
    }

    #[tokio::test]
    async fn finish_answers_the_trailers_status() {
        let mut r = reader(vec![], Some(ok_trailers()));
        r.finish().await.unwrap();
        let mut t = HeaderMap::new();
        crate::error::status_of(ErrorKind::NoSpace, "full")
            .add_header(&mut t)
            .unwrap();
        let e = reader(vec![], Some(t)).finish().await.unwrap_err();
        assert_eq!(crate::error::carried_kind(&e), Some(ErrorKind::NoSpace));
        assert_eq!(e.message(), "full");
        let e = reader(vec![], None).finish().await.unwrap_err();
        assert!(e.message().contains("without a gRPC status"), "{e:?}");
    }
}
