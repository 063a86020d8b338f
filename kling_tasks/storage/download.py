"""Safe, streamed, verified HTTP downloads: the source side of `Sink.store_from_url`."""

from __future__ import annotations

import hashlib
import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from .base import CHUNK_SIZE, DownloadError, UnsafeURLError

MAX_REDIRECTS = 5
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)  # read timeout is per chunk, not per file
_GONE = {401, 403, 404, 410}  # expired/invalid signed URL: trying again will not help
_TRANSIENT = {408, 425, 429}


def _refused(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    # `not is_global` covers loopback, RFC 1918, link-local (169.254.169.254 metadata), CGNAT 100.64/10
    # (another cloud's metadata address), ULA fd00::/8 (EC2's IPv6 metadata), unspecified and reserved.
    return not ip.is_global or ip.is_multicast


def check_download_url(url: str, allow_private: bool) -> None:
    """Refuse non-http(s) URLs and, unless allow_private, hosts resolving to any non-public address."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise UnsafeURLError(f"refusing download: malformed URL ({exc})") from exc
    if parsed.scheme not in ("http", "https"):
        raise UnsafeURLError(f"refusing download: scheme {parsed.scheme or '(none)'!r} is not http(s)")
    host = parsed.host
    if not host:
        raise UnsafeURLError("refusing download: URL has no host")
    if allow_private:
        return
    try:
        addresses = {ipaddress.ip_address(host)}
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, parsed.port or 443, type=socket.SOCK_STREAM)
        except OSError as exc:  # DNS hiccups are usually transient
            raise DownloadError(f"cannot resolve download host {host}: {exc}", retryable=True) from exc
        addresses = {ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos}
    bad = sorted(str(ip) for ip in addresses if _refused(ip))
    if bad:
        raise UnsafeURLError(
            f"refusing download from host {host}: it resolves to non-public address {', '.join(bad)} "
            "(set KLING_ALLOW_PRIVATE_URLS=1 for a local emulator)"
        )


@dataclass(frozen=True)
class Fetched:
    size: int
    sha256: str


def _status_error(status: int, host: str) -> DownloadError:
    retryable = status >= 500 or status in _TRANSIENT
    hint = " (the link has probably expired)" if status in _GONE else ""
    return DownloadError(f"download from {host} failed: HTTP {status}{hint}", retryable=retryable, status=status)


def fetch_to(
    url: str,
    write: Callable[[bytes], object],
    *,
    expected_size: int | None = None,
    allow_private: bool = False,
    http: httpx.Client | None = None,
) -> Fetched:
    """Stream `url` into `write` in fixed-size chunks, hashing and counting; verify the length.

    Redirects are followed by hand so that every hop passes `check_download_url`. Errors raised by
    `write` (the sink) propagate unchanged; the caller cleans up its partial object.
    """
    client = http if http is not None else httpx.Client(timeout=DEFAULT_TIMEOUT)
    try:
        for _ in range(MAX_REDIRECTS + 1):
            check_download_url(url, allow_private)
            host = httpx.URL(url).host
            try:
                with client.stream("GET", url, follow_redirects=False, headers={"Accept-Encoding": "identity"}) as resp:
                    if resp.is_redirect and "location" in resp.headers:
                        url = str(resp.url.join(resp.headers["location"]))
                        continue
                    if resp.status_code != 200:
                        raise _status_error(resp.status_code, host)
                    return _consume(resp, write, expected_size, host)
            except httpx.HTTPError as exc:  # connection refused/reset, timeouts, body cut off
                raise DownloadError(
                    f"download from {host} interrupted: {type(exc).__name__}: {exc}", retryable=True
                ) from exc
        raise DownloadError(f"download from {host}: more than {MAX_REDIRECTS} redirects", retryable=False)
    finally:
        if http is None:
            client.close()


def _consume(resp: httpx.Response, write: Callable[[bytes], object], expected_size: int | None, host: str) -> Fetched:
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
    limit = expected_size if expected_size is not None else declared
    digest, size = hashlib.sha256(), 0
    for chunk in resp.iter_bytes(CHUNK_SIZE):
        size += len(chunk)
        if limit is not None and size > limit:  # stop early: never store more than announced
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
