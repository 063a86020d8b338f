"""Where a job's start image comes from, what identifies it, and what of it may be stored.

A job's `image` is one of:
- a local .jpg/.jpeg/.png file: sent inline (base64), identified by its bytes;
- `s3://bucket/key`: read with the standard AWS chain (the destination's endpoint and credentials) and sent
  inline, identified by its bytes; nothing signed ever exists, so nothing signed can be stored;
- an http(s) URL: sent as it is, identified by the URL without its signing parameters, so a freshly signed
  URL of the same object is the same input (the signature is a credential, not content).

A presigned URL's signature and token must not reach Prefect: a flow's parameters are stored with its run.
`GenerationSpec` serializes its image through `withheld` (the signing values replaced), keeps the whole URL in
memory for the run in this process, and refuses a withheld URL (a UI retry, another worker) before any request.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from kling_tasks.api.catalog import IMAGE_SUFFIXES, MAX_IMAGE_BYTES
from kling_tasks.plan_error import PlanError

S3_SCHEME = "s3://"
WITHHELD = "withheld"

# A URL is signed when it carries an AWS SigV4 signature or session token or a GCS V4 signature, a V2-style
# `Signature` beside its key id (AWS, CloudFront, GCS), or an Azure SAS `sig` beside its version. (A bare
# `sig=1` is an ordinary parameter: such a URL keeps the identity it always had.) Names are lowercase.
_SIGNATURES = frozenset({"x-amz-signature", "x-amz-security-token", "x-goog-signature"})
_PAIRED_SIGNATURES = {"signature": frozenset({"awsaccesskeyid", "key-pair-id", "googleaccessid"}),
                      "sig": frozenset({"sv"})}
# What a signed URL's signing adds: withheld from what is stored, left out of its identity.
SIGNING = _SIGNATURES | frozenset(_PAIRED_SIGNATURES) | frozenset({
    "x-amz-algorithm", "x-amz-credential", "x-amz-date", "x-amz-expires", "x-amz-signedheaders",
    "awsaccesskeyid", "expires", "key-pair-id", "policy",
    "x-goog-algorithm", "x-goog-credential", "x-goog-date", "x-goog-expires", "x-goog-signedheaders",
    "googleaccessid",
    "sv", "ss", "srt", "sp", "se", "st", "spr", "sr", "skoid", "sktid", "skt", "ske", "sks", "skv", "sdd",
})


def is_url(image: str) -> bool:
    return image.startswith(("http://", "https://"))


def is_s3(image: str) -> bool:
    return image.startswith(S3_SCHEME)


def public_image(image: str) -> str:
    """An image as it may be shown (manifests, reprs): a URL without its query, fragment or user info (a
    presigned URL's signature and session token, a basic-auth password); a path or s3:// reference as it is."""
    if not is_url(image):
        return image
    parts = urlsplit(image)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=host, query="", fragment=""))


def _query(url: str) -> list[tuple[str, str]]:
    return parse_qsl(urlsplit(url).query, keep_blank_values=True)


def is_signed(url: str) -> bool:
    if not is_url(url):
        return False
    names = {name.lower() for name, _ in _query(url)}
    return bool(names & _SIGNATURES) or any(
        signature in names and names & partners for signature, partners in _PAIRED_SIGNATURES.items())


def withheld(url: str) -> str:
    """The URL as Prefect may store it: the value of every signing parameter replaced, user info dropped."""
    if not is_signed(url):
        return url
    parts = urlsplit(url)
    query = [(name, WITHHELD if name.lower() in SIGNING else value) for name, value in _query(url)]
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2], query=urlencode(query)))


def is_withheld(url: str) -> bool:
    signatures = _SIGNATURES | frozenset(_PAIRED_SIGNATURES)
    return is_signed(url) and any(name.lower() in signatures and value == WITHHELD for name, value in _query(url))


def unsigned(url: str) -> str:
    """The URL without its signing parameters (unchanged when it has no signature): what identifies it."""
    if not is_signed(url):
        return url
    kept = [(name, value) for name, value in _query(url) if name.lower() not in SIGNING]
    return urlunsplit(urlsplit(url)._replace(query=urlencode(kept)))


def split_s3(ref: str) -> tuple[str, str]:
    bucket, _, key = ref.removeprefix(S3_SCHEME).partition("/")
    if not bucket or not key or key.endswith("/"):
        raise PlanError(f"image {ref!r} is not an S3 object: expected s3://bucket/key.jpg")
    return bucket, key


def _check_suffix(image: str, name: str) -> None:
    if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
        raise PlanError(f"image {image!r} must be a .jpg, .jpeg or .png file, an s3:// object or an http(s) URL")


def _check_size(image: str, size: int) -> None:
    if size > MAX_IMAGE_BYTES:
        raise PlanError(f"image {image!r} is {size / 1e6:.1f} MB; Kling accepts at most "
                        f"{MAX_IMAGE_BYTES / 1024 / 1024:.0f} MB")


def check_url(url: str) -> None:
    """A URL is not fetched here (Kling fetches it), but a withheld one cannot be sent: a clear PlanError."""
    if is_withheld(url):
        raise PlanError(
            f"image {public_image(url)!r}: its signature was withheld from Prefect's stored parameters, so this "
            "run cannot send it; run the job again from the command line with the signed URL, or give the image "
            "as s3://bucket/key (read and sent inline, nothing signed is stored)")


def read_image(image: str) -> bytes:
    """The bytes to send inline for a local file or an s3:// object: a PlanError when it is missing,
    unreadable, not a .jpg/.jpeg/.png or over 10 MB."""
    return read_s3_image(image) if is_s3(image) else read_local_image(image)


def read_local_image(image: str) -> bytes:
    try:
        path = Path(image).expanduser()
    except RuntimeError:  # `~name/...` of a user that does not exist: was a traceback
        raise PlanError(f"image file {image!r} cannot be found: no home directory for its '~'") from None
    _check_suffix(image, path.name)
    try:
        if not path.is_file():
            raise PlanError(f"image {image!r} is not a file" if path.exists() else
                            f"image file {image!r} does not exist")
        _check_size(image, path.stat().st_size)
        return path.read_bytes()
    except OSError as exc:
        raise PlanError(f"image file {image!r} cannot be read: {exc.strerror or exc}") from None


def read_s3_image(ref: str) -> bytes:
    from botocore.exceptions import BotoCoreError, ClientError  # boto3 only for jobs that read from S3

    from kling_tasks.storage import S3Sink

    bucket, key = split_s3(ref)
    _check_suffix(ref, key)
    client = S3Sink(bucket).client
    try:
        _check_size(ref, int(client.head_object(Bucket=bucket, Key=key)["ContentLength"]))
        data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code"))
        what = "does not exist" if code in {"404", "NoSuchKey", "NotFound"} else f"cannot be read ({code})"
        raise PlanError(f"image {ref!r} {what}") from None
    except BotoCoreError as exc:
        raise PlanError(f"image {ref!r} cannot be read: {type(exc).__name__}") from None
    _check_size(ref, len(data))
    return data


def image_digest(image: str) -> str:
    """The image's part of the generation's identity: the bytes of a file or S3 object (a renamed or copied
    file is the same input, and so is the same picture in S3), the unsigned URL of a URL."""
    if is_url(image):
        return "url:" + hashlib.sha256(unsigned(image).encode()).hexdigest()
    return bytes_digest(read_image(image))


def bytes_digest(data: bytes) -> str:
    """The identity of a file's or S3 object's picture (what the submit checks the bytes it sends against)."""
    return "sha256:" + hashlib.sha256(data).hexdigest()
