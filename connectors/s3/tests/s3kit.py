"""Helpers for the S3 client suites: the server under test (``S3Server``),
boto3 clients for it, and raw HTTP requests (signed with botocore's own
SigV4 signer, or not at all) for what no client sends on purpose: bad
bodies, literal characters in the path, exact wire formats of other
clients.

Everything talks to 127.0.0.1 only."""

import base64
import contextlib
import hashlib
import http.client
import socket
import urllib.parse
import uuid
from dataclasses import dataclass, field

import boto3
import botocore.auth
import botocore.awsrequest
import botocore.credentials
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

ACCESS_KEY = "kvtier-test"
SECRET_KEY = "kvtier-test-secret"
REGION = "us-east-1"
# kvtierd's virtual-host domain in the test config: Host = {bucket}.s3.kvtier.test[:port].
VIRTUAL_DOMAIN = "s3.kvtier.test"


@dataclass
class S3Server:
    """The S3 endpoint under test and what it was configured with."""

    endpoint: str  # http://127.0.0.1:PORT
    kv: str = "kv-blocks"  # kind = "blocks"
    ckpt: str = "ckpt"  # kind = "objects"
    public: str = "public"  # kind = "objects", anonymous = true
    is_moto: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def host(self):
        return urllib.parse.urlsplit(self.endpoint).hostname

    @property
    def port(self):
        return urllib.parse.urlsplit(self.endpoint).port

    @property
    def netloc(self):
        return urllib.parse.urlsplit(self.endpoint).netloc

    def client(self, *, access_key=ACCESS_KEY, secret_key=SECRET_KEY, region=REGION, unsigned=False, **config):
        """A boto3 S3 client, path-style, no retries (a test sees the
        server's first answer)."""
        cfg = {
            "s3": {"addressing_style": "path"},
            "retries": {"max_attempts": 1, "mode": "standard"},
            "connect_timeout": 5,
            "read_timeout": 30,
        }
        cfg.update(config)
        if unsigned:
            cfg["signature_version"] = UNSIGNED
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=region,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=Config(**cfg),
        )

    def virtual_client(self, domain=VIRTUAL_DOMAIN, **kwargs):
        """A boto3 client using virtual-host addressing against `domain`:
        it signs and sends Host = {bucket}.{domain}:{port}, but connects to
        127.0.0.1 (the name does not resolve, and nothing may leave the
        machine): a before-send hook points the URL back at the endpoint
        and keeps the signed Host header."""
        c = boto3.session.Session().client(
            "s3",
            endpoint_url=f"http://{domain}:{self.port}",
            region_name=kwargs.pop("region", REGION),
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(
                s3={"addressing_style": "virtual"},
                retries={"max_attempts": 1, "mode": "standard"},
                **kwargs,
            ),
        )
        sent_hosts = []

        def to_loopback(request, **_):
            parts = urllib.parse.urlsplit(request.url)
            sent_hosts.append(parts.netloc)
            request.headers["Host"] = parts.netloc
            request.url = urllib.parse.urlunsplit(parts._replace(netloc=self.netloc))

        c.meta.events.register_last("before-send.s3", to_loopback)
        c.sent_hosts = sent_hosts
        return c


def unique(prefix="t"):
    """A key prefix no other test (or earlier run against a long-lived
    server) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def code_of(exc):
    """The S3 error code of a botocore ClientError (for HEAD, which has no
    body, botocore uses the HTTP status as the code)."""
    assert isinstance(exc, ClientError), f"expected a ClientError, got {exc!r}"
    return exc.response["Error"]["Code"]


def status_of(exc):
    return exc.response["ResponseMetadata"]["HTTPStatusCode"]


def b64(digest):
    return base64.b64encode(digest).decode()


def md5_b64(data):
    return b64(hashlib.md5(data).digest())


# Checksums as S3 spells them: base64 of the big-endian digest.
def crc32_b64(data):
    import zlib

    return b64(zlib.crc32(data).to_bytes(4, "big"))


def crc32c_b64(data):
    from awscrt import checksums

    return b64(checksums.crc32c(data).to_bytes(4, "big"))


def crc64nvme_b64(data):
    from awscrt import checksums

    return b64(checksums.crc64nvme(data).to_bytes(8, "big"))


def sha256_b64(data):
    return b64(hashlib.sha256(data).digest())


def sha1_b64(data):
    return b64(hashlib.sha1(data).digest())


CHECKSUMS = {
    "CRC32": crc32_b64,
    "CRC32C": crc32c_b64,
    "CRC64NVME": crc64nvme_b64,
    "SHA256": sha256_b64,
    "SHA1": sha1_b64,
}


@contextlib.contextmanager
def trailer_checksums():
    """Make botocore send its flexible checksums the way it does over
    HTTPS: an aws-chunked body (1 MiB chunks, lowercase hex sizes) with the
    checksum in a trailer, signed STREAMING-UNSIGNED-PAYLOAD-TRAILER. Over
    plain HTTP botocore puts the checksum in a header instead
    (botocore/httpchecksum.py, resolve_request_checksum_algorithm: trailers
    "only over TLS"), and the tests talk HTTP to 127.0.0.1."""
    import botocore.httpchecksum as hc

    real = hc.urlparse

    def as_https(url, *args, **kwargs):
        return real(url, *args, **kwargs)._replace(scheme="https")

    hc.urlparse = as_https
    try:
        yield
    finally:
        hc.urlparse = real


@contextlib.contextmanager
def signing_clock(offset):
    """Sign as if the clock were `offset` (a timedelta) off. botocore's
    SigV4 signers (header and presigned) take the signing time from
    ``get_current_datetime``: the Python ones in botocore.auth, and the
    awscrt ones in botocore.crt.auth, which botocore uses instead whenever
    awscrt is installed (as it is in the LMCache venv)."""
    import botocore.compat

    modules = [botocore.auth]
    try:
        import botocore.crt.auth

        modules.append(botocore.crt.auth)
    except ImportError:
        pass
    real = botocore.compat.get_current_datetime

    def shifted(*args, **kwargs):
        return real(*args, **kwargs) + offset

    for m in modules:
        m.get_current_datetime = shifted
    try:
        yield
    finally:
        for m in modules:
            m.get_current_datetime = real


def quote_key(key):
    """A key as botocore writes it into a path (safe: / and ~)."""
    return urllib.parse.quote(key, safe="/~")


@dataclass
class Response:
    status: int
    headers: dict
    body: bytes

    @property
    def code(self):
        """The <Code> of an S3 XML error body, or None."""
        import xml.etree.ElementTree as ET

        if not self.body:
            return None
        try:
            root = ET.fromstring(self.body)
        except ET.ParseError:
            return None
        for el in root.iter():
            if el.tag.rsplit("}", 1)[-1] == "Code":
                return el.text
        return None


def signed_headers(server, method, path, *, query="", headers=None, body=b"", payload_hash=None, region=REGION):
    """Headers for a request signed with botocore's S3 SigV4 signer.
    `path` is sent and signed exactly as given (already percent-encoded as
    the caller wants it on the wire). `payload_hash`: the
    x-amz-content-sha256 value (default: the body's SHA-256)."""
    url = f"{server.endpoint}{path}" + (f"?{query}" if query else "")
    declared = payload_hash or hashlib.sha256(body).hexdigest()

    class Signer(botocore.auth.S3SigV4Auth):
        # botocore sets x-amz-content-sha256 from payload(); declare ours.
        def payload(self, request):
            return declared

    req = botocore.awsrequest.AWSRequest(method=method, url=url, headers=dict(headers or {}), data=body)
    Signer(botocore.credentials.Credentials(ACCESS_KEY, SECRET_KEY), "s3", region).add_auth(req)
    out = dict(req.headers.items())
    assert out["X-Amz-Content-SHA256"] == declared
    out.setdefault("Host", server.netloc)
    return out


def raw(server, method, path, *, query="", headers=None, body=b"", chunks=None, timeout=30):
    """One HTTP/1.1 request on a fresh connection; `path` goes on the
    request line byte for byte. `chunks`: send the body with
    Transfer-Encoding: chunked, one HTTP chunk per item (no Content-Length)."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    try:
        target = path + (f"?{query}" if query else "")
        conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        hdrs = dict(headers or {})
        hdrs.setdefault("Host", server.netloc)
        if chunks is None and body is not None and "Content-Length" not in hdrs:
            hdrs["Content-Length"] = str(len(body))
        for k, v in hdrs.items():
            conn.putheader(k, v)
        conn.endheaders()
        if chunks is not None:
            for c in chunks:
                conn.send(b"%X\r\n%s\r\n" % (len(c), c))
            conn.send(b"0\r\n\r\n")
        elif body:
            conn.send(body)
        resp = conn.getresponse()
        data = resp.read()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()


def aws_chunked(payload, trailer_name, trailer_value, *, chunk_bytes=64 * 1024, upper_hex=True):
    """An aws-chunked body with a trailing checksum, as NIXL's OBJ plugin
    (aws-sdk-cpp) writes it: `<HEX>\\r\\n<data>\\r\\n` per chunk, then
    `0\\r\\n<name>:<value>\\r\\n\\r\\n`."""
    out = b""
    for i in range(0, len(payload), chunk_bytes):
        c = payload[i : i + chunk_bytes]
        size = b"%X" % len(c) if upper_hex else b"%x" % len(c)
        out += size + b"\r\n" + c + b"\r\n"
    out += b"0\r\n%s:%s\r\n\r\n" % (trailer_name.encode(), trailer_value.encode())
    return out


def send_raw_bytes(server, data, *, half_close=True, timeout=10):
    """Writes `data` on a fresh TCP connection, optionally half-closes it,
    and returns whatever the server answers (b"" if it just closes)."""
    with socket.create_connection((server.host, server.port), timeout=timeout) as s:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        got = b""
        try:
            while True:
                b = s.recv(65536)
                if not b:
                    break
                got += b
        except (ConnectionResetError, socket.timeout):
            pass
        return got
