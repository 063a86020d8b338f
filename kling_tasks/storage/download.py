"""Safe, streamed, verified HTTP downloads: the source side of `Sink.store_from_url`.

The URL comes from Kling's answer, so its host is not trusted: every TCP connection goes to an address that
was resolved and checked for that very connection (no second DNS answer can swap in a private one), no
environment proxy is used (a proxy would resolve the name itself), TLS is always verified against the URL's
host name, and a body without a Content-Length stops at a size cap.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpcore
import httpx

from .base import CHUNK_SIZE, DownloadError, UnsafeURLError

MAX_REDIRECTS = 5
# Far above any Kling video (3 minutes of 1080p is a few hundred MB); it stops an endless or hostile body.
MAX_DOWNLOAD_BYTES = 4 * 1024**3
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)  # read timeout is per chunk, not per file
_GONE = {401, 403, 404, 410}  # expired/invalid signed URL: trying again will not help
_TRANSIENT = {408, 425, 429}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _refused(ip: IPAddress) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    # `not is_global` covers loopback, RFC 1918, link-local (169.254.169.254 metadata), CGNAT 100.64/10
    # (another cloud's metadata address), ULA fd00::/8 (EC2's IPv6 metadata), unspecified and reserved.
    return not ip.is_global or ip.is_multicast


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return None


def _resolve(host: str, port: int) -> list[IPAddress]:
    """Every address of `host`, in the resolver's order, from one DNS answer."""
    literal = _literal(host)
    if literal is not None:
        return [literal]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:  # DNS hiccups are usually transient
        raise DownloadError(f"cannot resolve download host {host}: {exc}", retryable=True) from exc
    addresses: list[IPAddress] = []
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if ip not in addresses:
            addresses.append(ip)
    return addresses


def _check_addresses(host: str, addresses: Iterable[IPAddress]) -> None:
    bad = sorted(str(ip) for ip in addresses if _refused(ip))
    if bad:
        raise UnsafeURLError(
            f"refusing download from host {host}: it resolves to non-public address {', '.join(bad)} "
            "(set KLING_ALLOW_PRIVATE_URLS=1 for a local emulator)"
        )


def _check_shape(url: str, allow_private: bool) -> httpx.URL:
    """Scheme and host, without DNS: http(s) only, a host, and no literal private address."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise UnsafeURLError(f"refusing download: malformed URL ({exc})") from exc
    if parsed.scheme not in ("http", "https"):
        raise UnsafeURLError(f"refusing download: scheme {parsed.scheme or '(none)'!r} is not http(s)")
    if not parsed.host:
        raise UnsafeURLError("refusing download: URL has no host")
    literal = _literal(parsed.host)
    if literal is not None and not allow_private:
        _check_addresses(parsed.host, [literal])
    return parsed


def check_download_url(url: str, allow_private: bool) -> None:
    """Refuse non-http(s) URLs and, unless allow_private, hosts resolving to any non-public address.

    A check ahead of the request; `fetch_to`'s own client checks again at each connection, on the address
    it then connects to.
    """
    parsed = _check_shape(url, allow_private)
    if not allow_private:
        _check_addresses(parsed.host, _resolve(parsed.host, parsed.port or 443))


class _CheckedBackend(httpcore.SyncBackend):
    """Resolves the host once per connection, refuses it if any address is not public (unless
    allow_private), and connects to those very addresses. TLS (SNI, certificate check) still uses the
    URL's host name: httpcore starts TLS over this stream with the origin's name."""

    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None) -> httpcore.NetworkStream:
        addresses = _resolve(host, port)
        if not self.allow_private:
            _check_addresses(host, addresses)
        failure: httpcore.ConnectError | httpcore.ConnectTimeout | None = None
        for ip in addresses:
            try:
                return super().connect_tcp(str(ip), port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        raise failure if failure is not None else httpcore.ConnectError(f"no address for {host}")


class GuardedTransport(httpx.HTTPTransport):
    """httpx's own transport with the checked backend, no proxy, TLS verified, no connection reuse (a
    redirect to another name on the same address gets its own check and its own TLS handshake)."""

    def __init__(self, allow_private: bool) -> None:
        context = verified_tls_context()
        super().__init__(verify=context)
        # HTTPTransport takes no network backend; its pool is the one attribute it sends requests through.
        self._pool = httpcore.ConnectionPool(
            ssl_context=context,
            max_keepalive_connections=0,
            network_backend=_CheckedBackend(allow_private),
        )


_TLS_CONTEXTS: dict[tuple[str | None, str | None], ssl.SSLContext] = {}


def verified_tls_context() -> ssl.SSLContext:
    """One verifying TLS context per trusted-CA setting (SSL_CERT_FILE/DIR may name the CAs), shared by every
    download: building one loads the CA store, ~10 ms of CPU, and each download built two."""
    key = (os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
    context = _TLS_CONTEXTS.get(key)
    if context is None:
        context = _TLS_CONTEXTS[key] = httpx.create_ssl_context(verify=True)
    return context


def guarded_client(allow_private: bool) -> httpx.Client:
    # A jar that keeps no cookie: one download's server must not hand cookies to the next (a shared client).
    no_cookies = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
    return httpx.Client(transport=GuardedTransport(allow_private), timeout=DEFAULT_TIMEOUT, trust_env=False,
                        cookies=no_cookies)


_shared: dict[tuple[int, bool, str | None, str | None], httpx.Client] = {}
_shared_lock = threading.Lock()


def shared_guarded_client(allow_private: bool) -> httpx.Client:
    """One guarded client per process, per `allow_private` and per trusted-CA setting (SSL_CERT_FILE/DIR).

    Building one loads the CA bundle (0.1-0.3 s on a busy 2-core machine, more than a small store). Sharing
    it shares no connection and no check: its pool keeps none alive, so every request still connects to an
    address resolved and checked for that connection. httpx clients may be shared between threads.
    """
    key = (os.getpid(), allow_private, os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
    with _shared_lock:
        client = _shared.get(key)
        if client is None or client.is_closed:
            client = _shared[key] = guarded_client(allow_private)
        return client


@dataclass(frozen=True)
class Fetched:
    size: int
    sha256: str


def _status_error(status: int, host: str) -> DownloadError:
    retryable = status >= 500 or status in _TRANSIENT
    hint = " (the link has probably expired)" if status in _GONE else ""
    return DownloadError(f"download from {host} failed: HTTP {status}{hint}", retryable=retryable, status=status)


def _transport_error(exc: httpx.HTTPError, host: str) -> DownloadError:
    cause: BaseException | None = exc
    while cause is not None:  # httpx wraps httpcore's error, which wraps the ssl module's
        if isinstance(cause, ssl.SSLCertVerificationError):
            return DownloadError(f"download from {host} refused: its TLS certificate does not verify "
                                 f"({cause.verify_message})", retryable=False)
        cause = cause.__cause__ or cause.__context__
    # Only the host and httpx's reason: the URL's query (a signature) stays out of the message.
    return DownloadError(f"download from {host} interrupted: {type(exc).__name__}: {exc}", retryable=True)


def fetch_to(
    url: str,
    write: Callable[[bytes], object],
    *,
    expected_size: int | None = None,
    allow_private: bool = False,
    http: httpx.Client | None = None,
    max_bytes: int = MAX_DOWNLOAD_BYTES,
) -> Fetched:
    """Stream `url` into `write` in fixed-size chunks, hashing and counting; verify the length.

    Redirects are followed by hand so that every hop passes the URL check. Without `http`, the client is
    the process's `shared_guarded_client` (addresses checked at connect time, no proxy); a caller's client
    (tests) gets the check ahead of each request only. Errors raised by `write` (the sink) propagate
    unchanged; the caller cleans up its partial object.
    """
    client = http if http is not None else shared_guarded_client(allow_private)
    for _ in range(MAX_REDIRECTS + 1):
        if http is None:
            host = _check_shape(url, allow_private).host  # names are checked by the client, on connect
        else:
            check_download_url(url, allow_private)
            host = httpx.URL(url).host
        try:
            with client.stream("GET", url, follow_redirects=False, headers={"Accept-Encoding": "identity"}) as resp:
                if resp.is_redirect and "location" in resp.headers:
                    url = str(resp.url.join(resp.headers["location"]))
                    continue
                if resp.status_code != 200:
                    raise _status_error(resp.status_code, host)
                return _consume(resp, write, expected_size, host, max_bytes)
        except httpx.HTTPError as exc:  # connection refused/reset, timeouts, body cut off, TLS
            raise _transport_error(exc, host) from exc
    raise DownloadError(f"download from {host}: more than {MAX_REDIRECTS} redirects", retryable=False)


def _consume(resp: httpx.Response, write: Callable[[bytes], object], expected_size: int | None, host: str,
             max_bytes: int) -> Fetched:
    declared: int | None = None
    encoded = resp.headers.get("content-encoding", "identity").lower() not in ("", "identity")
    if "content-length" in resp.headers and not encoded:  # compressed lengths are not body lengths
        try:
            declared = int(resp.headers["content-length"])
        except ValueError:
            declared = None
    if declared is not None and expected_size is not None and declared != expected_size:
        raise DownloadError(
            f"download from {host}: server announces {declared} bytes, expected {expected_size}",
            retryable=False,
        )
    if declared is not None and declared > max_bytes:
        raise DownloadError(f"download from {host}: server announces {declared} bytes, over the "
                            f"{max_bytes}-byte cap", retryable=False)
    # The cap holds whatever the server announces (or does not): a body without a length stops there too.
    announced = expected_size if expected_size is not None else declared
    limit = max_bytes if announced is None else min(announced, max_bytes)
    digest, size = hashlib.sha256(), 0
    for chunk in resp.iter_bytes(CHUNK_SIZE):
        size += len(chunk)
        if size > limit:  # stop early: never store more than announced, nor more than the cap
            raise DownloadError(f"download from {host}: more than {limit} bytes", retryable=False)
        digest.update(chunk)
        write(chunk)
    if declared is not None and size != declared:
        raise DownloadError(f"download from {host} cut off: got {size} of {declared} bytes", retryable=True)
    if expected_size is not None and size != expected_size:
        # Without a Content-Length a short body looks like a cut-off transfer: worth another try.
        raise DownloadError(
            f"download from {host}: got {size} bytes, expected {expected_size}",
            retryable=declared is None and size < expected_size,
        )
    return Fetched(size=size, sha256=digest.hexdigest())
