//! Every error kind crosses a real HTTP/2 connection and comes out of the
//! client as the same kind with the same message: a gRPC service that
//! refuses each call with `kvtier_proto::error::status` (what kvtierd's
//! handlers answer), the kind named by the caller's bearer token.

use kvtier::{BlockKey, Error, ErrorKind, NamespaceId};
use kvtier_client::{Client, ClientConfig};
use std::convert::Infallible;
use std::future::{Ready, ready};
use std::task::{Context, Poll};
use tonic::body::Body;

/// Answers every call of the KvTier service with the error whose kind the
/// bearer token names.
#[derive(Clone)]
struct Refuses;

impl tower_service::Service<http::Request<Body>> for Refuses {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let token = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        let kind = ErrorKind::from_name(token).expect("the test names a kind");
        let e = Error::new(kind, format!("refused as {} ({token})", kind.name()));
        ready(Ok(kvtier_proto::error::status(&e).into_http()))
    }
}

impl tonic::server::NamedService for Refuses {
    const NAME: &'static str = "kvtier.v1.KvTier";
}

#[tokio::test]
async fn every_kind_crosses_the_wire_as_itself() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(Refuses)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let ns = NamespaceId(7);
    for kind in ErrorKind::ALL {
        let c = Client::connect(&ClientConfig {
            endpoint: format!("http://{addr}"),
            token: Some(kind.name().to_string()),
            ..Default::default()
        })
        .await
        .unwrap();
        // A call tonic frames, and the two this client frames by hand (a
        // Put refused before its bytes are read, and a Get).
        let errors = [
            c.lookup(ns, &[BlockKey(1)]).await.unwrap_err(),
            c.put(ns, &[BlockKey(1)], bytes::Bytes::from(vec![3u8; 1 << 20]))
                .await
                .unwrap_err(),
            c.get(ns, &[BlockKey(1)]).await.unwrap_err(),
        ];
        for e in errors {
            assert_eq!(e.kind(), kind, "{e}");
            assert_eq!(
                e.message(),
                format!("refused as {} ({})", kind.name(), kind.name()),
                "{kind:?}"
            );
        }
    }
    server.abort();
}
