"""The download guard against hostile result URLs, on real sockets: DNS rebinding (the connection goes to the
address that was checked), redirects, environment proxies, the size cap without a Content-Length, and TLS
verification (SNI and the certificate check use the URL's name while the socket goes to the checked address).

The test servers listen on 127.0.0.1, which the guard refuses. Where a test needs a "public" server, it tells
the guard's address policy that one loopback address counts as public (`treat_as_public`); every other address
keeps the real policy.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import socket
import ssl
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kling_tasks.storage import DownloadError, LocalSink, UnsafeURLError, check_download_url
from kling_tasks.storage import download as download_module
from kling_tasks.storage.download import fetch_to
from tests.hostile_strategies import examples

REAL_GETADDRINFO = socket.getaddrinfo
META = {"job_id": "job1", "task_id": "t-1", "step": "0"}


class FakeDNS:
    """Answers names from a script (one answer per lookup, the last one repeating) and counts lookups;
    numeric hosts go to the real resolver (the socket layer resolves the address it connects to)."""

    def __init__(self, script: dict[str, list[list[str]]]) -> None:
        self.script = script
        self.lookups: Counter[str] = Counter()

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        name = host.decode() if isinstance(host, bytes) else str(host)
        try:
            ipaddress.ip_address(name)
        except ValueError:
            answers = self.script[name]
            answer = answers[min(self.lookups[name], len(answers) - 1)]
            self.lookups[name] += 1
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in answer]
        return REAL_GETADDRINFO(host, port, *args, **kwargs)


def fake_dns(monkeypatch: pytest.MonkeyPatch, script: dict[str, list[list[str]]]) -> FakeDNS:
    dns = FakeDNS(script)
    monkeypatch.setattr(socket, "getaddrinfo", dns)
    return dns


def treat_as_public(monkeypatch: pytest.MonkeyPatch, *addresses: str) -> None:
    real = download_module._refused
    public = {ipaddress.ip_address(a) for a in addresses}
    monkeypatch.setattr(download_module, "_refused", lambda ip: ip not in public and real(ip))


def collect(url: str, **kwargs: Any) -> bytes:
    parts: list[bytes] = []
    fetch_to(url, parts.append, **kwargs)
    return b"".join(parts)


# ---- DNS rebinding ---------------------------------------------------------------------------------------


def test_the_connection_goes_to_the_address_that_was_checked(monkeypatch: pytest.MonkeyPatch, source: Any) -> None:
    """First answer: the (public) server; any later answer: an address the policy refuses. One lookup per
    connection, so the second answer is never used (before the guard, httpx resolved again and connected there)."""
    treat_as_public(monkeypatch, "127.0.0.1")
    port = source.server.server_address[1]
    source.add("/v", b"the video")
    dns = fake_dns(monkeypatch, {"cdn.example": [["127.0.0.1"], ["127.0.0.2"]]})
    assert collect(f"http://cdn.example:{port}/v") == b"the video"
    assert dns.lookups["cdn.example"] == 1 and source.hits["/v"] == 1


def test_a_name_that_rebinds_to_a_private_address_after_the_check_is_refused_at_connect(
        monkeypatch: pytest.MonkeyPatch, source: Any) -> None:
    treat_as_public(monkeypatch, "127.0.0.2")  # the server's own 127.0.0.1 keeps the real policy: refused
    port = source.server.server_address[1]
    source.add("/v", b"internal data")
    dns = fake_dns(monkeypatch, {"cdn.example": [["127.0.0.2"], ["127.0.0.1"]]})
    url = f"http://cdn.example:{port}/v"
    check_download_url(url, allow_private=False)  # the first answer passes a check made ahead
    with pytest.raises(UnsafeURLError, match=r"cdn\.example.*127\.0\.0\.1"):
        collect(url)
    assert dns.lookups["cdn.example"] == 2 and source.hits["/v"] == 0


def test_a_mixed_answer_is_refused_whole(monkeypatch: pytest.MonkeyPatch, source: Any) -> None:
    treat_as_public(monkeypatch, "127.0.0.1")
    port = source.server.server_address[1]
    source.add("/v", b"x")
    fake_dns(monkeypatch, {"mixed.example": [["127.0.0.1", "169.254.169.254"]]})
    with pytest.raises(UnsafeURLError, match=r"169\.254\.169\.254"):
        collect(f"http://mixed.example:{port}/v")
    assert source.hits["/v"] == 0


@pytest.mark.parametrize("target", ["http://inner.example/latest/meta-data/", "http://169.254.169.254/latest/",
                                    "http://[::ffff:10.0.0.1]/v", "file:///etc/passwd", "ftp://cdn.example/v"])
def test_a_redirect_is_checked_like_the_first_url(monkeypatch: pytest.MonkeyPatch, source: Any, target: str) -> None:
    treat_as_public(monkeypatch, "127.0.0.1")
    port = source.server.server_address[1]
    source.add("/r", mode="redirect", location=target)
    fake_dns(monkeypatch, {"cdn.example": [["127.0.0.1"]], "inner.example": [["169.254.169.254"]]})
    with pytest.raises(UnsafeURLError, match="refusing download"):
        collect(f"http://cdn.example:{port}/r")
    assert source.hits["/r"] == 1


def test_allow_private_still_connects_to_the_resolved_address(monkeypatch: pytest.MonkeyPatch, source: Any) -> None:
    port = source.server.server_address[1]
    source.add("/v", b"emulator video")
    dns = fake_dns(monkeypatch, {"emulator.local": [["127.0.0.1"], ["127.0.0.2"]]})
    assert collect(f"http://emulator.local:{port}/v", allow_private=True) == b"emulator video"
    assert dns.lookups["emulator.local"] == 1


_PRIVATE_NETWORKS = ["127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16",
                     "100.64.0.0/10", "0.0.0.0/8", "224.0.0.0/4", "240.0.0.0/4"]
_PRIVATE_V6 = ["::1/128", "fc00::/7", "fe80::/10", "ff00::/8"]


@settings(max_examples=examples(100))
@given(st.one_of(
    st.sampled_from(_PRIVATE_NETWORKS).flatmap(lambda net: st.ip_addresses(v=4, network=net)),
    st.sampled_from(_PRIVATE_V6).flatmap(lambda net: st.ip_addresses(v=6, network=net)),
    st.sampled_from(_PRIVATE_NETWORKS).flatmap(lambda net: st.ip_addresses(v=4, network=net)).map(
        lambda ip: ipaddress.IPv6Address(f"::ffff:{ip}")),
), st.booleans())
def test_any_non_public_address_is_refused_as_a_literal_or_behind_a_name(
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address, behind_a_name: bool) -> None:
    host = f"[{ip}]" if ip.version == 6 else str(ip)
    if not behind_a_name:
        with pytest.raises(UnsafeURLError, match="refusing download from host"):
            check_download_url(f"https://{host}/v.mp4", allow_private=False)
        return
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    answer = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", 443)),
              (family, socket.SOCK_STREAM, 6, "", (str(ip), 443))]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "getaddrinfo", lambda *_args, **_kw: answer)
        with pytest.raises(UnsafeURLError, match=re.escape(str(ip))):
            download_module._CheckedBackend(allow_private=False).connect_tcp("cdn.example", 443)


# ---- proxies ---------------------------------------------------------------------------------------------


class RecordingProxy:
    """An HTTP "proxy" that answers every request itself and counts them: nothing should reach it."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self) -> None:
                proxy.requests.append(f"{self.command} {self.path}")
                self.send_response(200)
                self.send_header("Content-Length", "10")
                self.end_headers()
                self.wfile.write(b"from proxy")

            do_GET = do_CONNECT = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def env_proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[RecordingProxy]:
    proxy = RecordingProxy()
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.setenv(name, proxy.url)
        monkeypatch.setenv(name.lower(), proxy.url)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    yield proxy
    proxy.close()


def test_environment_proxies_are_not_used(env_proxy: RecordingProxy, source: Any, tmp_path: Path) -> None:
    url = source.add("/v", b"direct bytes")
    stored = LocalSink(tmp_path).store_from_url(url, "job1/step-00.mp4", metadata=META, allow_private=True)
    assert (tmp_path / "job1/step-00.mp4").read_bytes() == b"direct bytes" and stored.size == 12
    assert env_proxy.requests == [] and source.hits["/v"] == 1


def test_a_proxy_cannot_carry_a_private_name_past_the_check(env_proxy: RecordingProxy,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    fake_dns(monkeypatch, {"internal.example": [["10.0.0.5"]]})
    for scheme in ("http", "https"):
        with pytest.raises(UnsafeURLError, match=r"10\.0\.0\.5"):
            collect(f"{scheme}://internal.example/secrets")
    assert env_proxy.requests == []


# ---- size cap --------------------------------------------------------------------------------------------


def test_the_size_cap_holds_without_a_content_length(source: Any) -> None:
    cap = 1024 * 1024 + 10
    url = source.add("/endless", b"z" * (3 * 1024 * 1024), mode="nolength")
    written: list[bytes] = []
    with pytest.raises(DownloadError, match=f"more than {cap} bytes") as err:
        fetch_to(url, written.append, allow_private=True, max_bytes=cap)
    assert err.value.retryable is False and sum(map(len, written)) <= cap


def test_an_announced_size_over_the_cap_is_refused_before_the_body(source: Any) -> None:
    url = source.add("/big", b"z" * 5000)
    written: list[bytes] = []
    with pytest.raises(DownloadError, match="announces 5000 bytes, over the 4000-byte cap"):
        fetch_to(url, written.append, allow_private=True, max_bytes=4000)
    assert written == []


def test_the_default_cap_applies_to_every_store() -> None:
    assert fetch_to.__kwdefaults__["max_bytes"] == download_module.MAX_DOWNLOAD_BYTES <= 8 * 1024**3


# ---- TLS -------------------------------------------------------------------------------------------------


def _certificates(tmp_path: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA (its PEM) and a server certificate for `name` signed by it (cert PEM, key PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kling test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_pem, cert_pem, key_pem = tmp_path / f"ca-{name}.pem", tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return ca_pem, cert_pem, key_pem


class TLSSource:
    """An https server on 127.0.0.1 with the given certificate; records the SNI name and Host header."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.sni: list[str | None] = []
        self.hosts: list[str | None] = []
        tls = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                tls.hosts.append(self.headers.get("Host"))
                self.send_response(200)
                self.send_header("Content-Length", "6")
                self.end_headers()
                self.wfile.write(b"secure")

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        context.sni_callback = lambda _sock, name, _ctx: tls.sni.append(name)  # type: ignore[assignment,func-returns-value]
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()
        self.port = self.server.server_address[1]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def tls_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    servers: list[TLSSource] = []

    def start(cert_name: str, trusted: bool) -> TLSSource:
        ca, cert, key = _certificates(tmp_path, cert_name)
        if trusted:
            monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # the documented way to trust a private CA
        else:
            monkeypatch.delenv("SSL_CERT_FILE", raising=False)
        monkeypatch.delenv("SSL_CERT_DIR", raising=False)
        servers.append(TLSSource(cert, key))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_tls_uses_the_url_name_for_sni_and_verification_while_connecting_to_the_checked_address(
        tls_for: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    server = tls_for("cdn.example", trusted=True)
    treat_as_public(monkeypatch, "127.0.0.1")
    fake_dns(monkeypatch, {"cdn.example": [["127.0.0.1"], ["127.0.0.2"]]})
    assert collect(f"https://cdn.example:{server.port}/v.mp4") == b"secure"
    assert server.sni == ["cdn.example"] and server.hosts == [f"cdn.example:{server.port}"]


@pytest.mark.parametrize(("cert_name", "trusted", "reason"), [
    ("other.example", True, "Hostname mismatch"),
    ("cdn.example", False, "unable to get local issuer certificate"),
])
def test_a_certificate_that_does_not_verify_is_refused(tls_for: Any, monkeypatch: pytest.MonkeyPatch,
                                                       cert_name: str, trusted: bool, reason: str) -> None:
    server = tls_for(cert_name, trusted=trusted)
    fake_dns(monkeypatch, {"cdn.example": [["127.0.0.1"]]})
    with pytest.raises(DownloadError, match=f"TLS certificate does not verify.*{reason}") as err:
        collect(f"https://cdn.example:{server.port}/v.mp4", allow_private=True)  # the emulator switch too
    assert err.value.retryable is False and server.hosts == []


# ---- what a failed download says ------------------------------------------------------------------------

SIGNATURE, TOKEN = "c0ffee" * 10, "FwoGZXIvYXdzEscan0session0token"


def _signed(url: str) -> str:
    return f"{url}?X-Amz-Signature={SIGNATURE}&X-Amz-Security-Token={TOKEN}&Expires=1"


@pytest.mark.parametrize("failure", ["404", "cut", "refused", "cap", "redirect-loop", "private", "tls"])
def test_a_failed_download_names_the_host_never_the_signed_query(failure: str, source: Any, tls_for: Any,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    kwargs: dict[str, Any] = {"allow_private": True}
    if failure == "404":
        url = source.url("/missing")
    elif failure == "cut":
        url = source.add("/cut", b"v" * 5000, mode="cut")
    elif failure == "refused":
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{probe.getsockname()[1]}/v"
    elif failure == "cap":
        url, kwargs["max_bytes"] = source.add("/big", b"v" * 5000, mode="nolength"), 100
    elif failure == "redirect-loop":
        url = source.add("/loop", mode="redirect", location=_signed("/loop"))
    elif failure == "private":
        url, kwargs["allow_private"] = source.add("/v", b"v"), False
    else:
        url = f"https://127.0.0.1:{tls_for('cdn.example', trusted=False).port}/v"
    with pytest.raises(DownloadError) as err:
        collect(_signed(url), **kwargs)
    for text in (str(err.value), repr(err.value), "".join(map(str, err.value.args))):
        assert SIGNATURE not in text and TOKEN not in text and "127.0.0.1" in text, text


# --- one guarded client per process: shared, yet no connection, cookie or check carried over ---------------------


def test_the_shared_client_keeps_no_cookie_and_no_connection_between_downloads(
        monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str | None, int]] = []  # (the Cookie header, the client's port) per request

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive offered: the client must still not reuse the connection

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            seen.append((self.headers.get("Cookie"), self.client_address[1]))
            self.send_response(200)
            self.send_header("Set-Cookie", "session=from-the-first-server; Path=/")
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"video")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    built: list[bool] = []
    real_client = download_module.guarded_client
    monkeypatch.setattr(download_module, "_shared", {})
    monkeypatch.setattr(download_module, "guarded_client", lambda allow: built.append(allow) or real_client(allow))
    try:
        dns = FakeDNS({"cdn.example": [["127.0.0.1"]]})
        monkeypatch.setattr(socket, "getaddrinfo", dns)
        url = f"http://cdn.example:{server.server_address[1]}/v.mp4"
        for _ in range(2):
            assert fetch_to(url, lambda _: None, allow_private=True).size == 5
    finally:
        server.shutdown()
        server.server_close()
    assert built == [True], "one client for both downloads"
    assert download_module.shared_guarded_client(False) is not download_module.shared_guarded_client(True)
    assert [cookie for cookie, _ in seen] == [None, None], "a cookie went from one download to the next"
    assert seen[0][1] != seen[1][1], "the second download reused the first one's connection"
    assert dns.lookups["cdn.example"] == 2, "each connection resolves (and checks) the name again"
