//! The methods that carry block bytes, served with frames made and parsed
//! by hand (`kvtier_proto::wire`): `KvTier/Put`, `KvTier/Get`,
//! `Peer/ReplicaPut` and `Peer/ReplicaGet`. [`WithBulk`] sits in front of
//! a generated service and hands it every other method.
//!
//! tonic's codec copies each message into a buffer of its own on the way
//! in and on the way out; for these methods that was most of the cost of a
//! block over the socket. Here a received payload is copied once, from the
//! HTTP/2 frames into the request's pooled buffer, and a sent one not at
//! all: its frames are slices of the buffer the blocks were loaded into.
//! The wire format is the proto's, so every gRPC client works as before.

use bytes::Bytes;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::server::NamedService;

use crate::MAX_MESSAGE_BYTES;
use crate::peer::PeerService;
use crate::service::KvTierService;
use kvtier::ErrorKind;
use kvtier_proto::wire::{self, MessageReader};

/// The paths served here.
const PUT: &str = "/kvtier.v1.KvTier/Put";
const GET: &str = "/kvtier.v1.KvTier/Get";
const REPLICA_PUT: &str = "/kvtier.v1.Peer/ReplicaPut";
const REPLICA_GET: &str = "/kvtier.v1.Peer/ReplicaGet";

/// What serves the bulk methods of one service.
#[derive(Clone, Debug)]
pub(crate) enum Bulk {
    KvTier(KvTierService),
    Peer(PeerService),
}

/// A generated service `S` with its bulk methods served by [`Bulk`].
#[derive(Clone, Debug)]
pub(crate) struct WithBulk<S> {
    inner: S,
    bulk: Bulk,
}

impl<S> WithBulk<S> {
    pub(crate) fn new(inner: S, bulk: Bulk) -> Self {
        Self { inner, bulk }
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

impl<S> Service<http::Request<Body>> for WithBulk<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> BoxFuture {
        let reader = |req: http::Request<Body>| {
            // The client's fault when the stream is malformed.
            MessageReader::new(req.into_body(), MAX_MESSAGE_BYTES, ErrorKind::InvalidArgument)
        };
        match (&self.bulk, req.uri().path()) {
            (Bulk::KvTier(s), PUT) => {
                let s = s.clone();
                Box::pin(async move { Ok(unary(s.put_bulk(reader(req)).await)) })
            }
            (Bulk::KvTier(s), GET) => {
                let s = s.clone();
                Box::pin(async move { Ok(reply(s.get_bulk(reader(req)).await)) })
            }
            (Bulk::Peer(s), REPLICA_PUT) => {
                let s = s.clone();
                Box::pin(async move { Ok(unary(s.replica_put_bulk(reader(req)).await)) })
            }
            (Bulk::Peer(s), REPLICA_GET) => {
                let s = s.clone();
                Box::pin(async move { Ok(reply(s.replica_get_bulk(reader(req)).await)) })
            }
            _ => Box::pin(self.inner.call(req)),
        }
    }
}

impl<S: NamedService> NamedService for WithBulk<S> {
    const NAME: &'static str = S::NAME;
}

/// What the generated service answers for a method [`WithBulk`] serves: it
/// never sees one, since kvtierd always puts it behind [`WithBulk`].
pub(crate) fn not_here(method: &str) -> Status {
    kvtier_proto::error::status_of(
        ErrorKind::Internal,
        format!("{method} is served by kvtierd's bulk path, which did not see this call"),
    )
}

/// The answer of a call with one reply message.
fn unary(r: Result<impl prost::Message, Status>) -> http::Response<Body> {
    reply(r.map(|m| vec![wire::message(&m)]))
}

/// The answer of a call: its message frames and an OK status, or the
/// error's status alone (in the headers, as gRPC answers a call that
/// fails before any message).
fn reply(r: Result<Vec<Bytes>, Status>) -> http::Response<Body> {
    match r {
        Ok(frames) => {
            let mut resp = http::Response::new(wire::body(frames, Some(wire::ok_trailers())));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            resp
        }
        Err(s) => s.into_http(),
    }
}
