"""What makes paid work "the same" (DESIGN §2): external ids, the account fingerprint, cache keys.

- Paid work is identified by its content chain in a namespace: `chain_0 = H(generation, image digest, take)`,
  `chain_i = H(chain_{i-1}, extension i, attempt i)`, `external_task_id = {ns}-s{i}-{chain_i[:16]}`. The
  namespace is the user's job id when given (a job id is a namespace), else the fixed `kp`: the same content
  on the same account is the same task, and appending an extension pays for the new step only.
- Digests cover only values that differ from their defaults, so adding an optional field in a later release
  leaves every existing id alone (a changed id would make in-flight jobs pay again after an upgrade).
- An account is `H(provider, base URL, key)[:12]`: part of every cache key, never reversible to the key.

Everything here is pure: no HTTP, no Prefect.
"""

from __future__ import annotations

import hashlib
import json

from kling_tasks.settings import KlingSettings

CACHE_VERSION = "v2"  # bump deliberately: a new version re-runs every step (adoption still saves the money)
DERIVED_NAMESPACE = "kp"  # the namespace of jobs without a user-given job id
DIGEST_CHARS = 16


def digest(value: object) -> str:
    """sha256 of the canonical JSON of `value` (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def generation_content(spec: dict[str, object], image_digest: str | None, take: int) -> dict[str, object]:
    """Step 0's content: its non-default fields, the image's digest (kling_tasks.image_sources), and the take
    when it is not the first."""
    content: dict[str, object] = {key: value for key, value in spec.items() if key != "image"}
    if image_digest is not None:
        content["image"] = image_digest
    if take != 1:
        content["take"] = take
    return content


def chain_digest(parent: str | None, content: dict[str, object], attempt: int) -> str:
    """One link of the chain: the parent's digest, this step's content, and its attempt when not the first."""
    link: dict[str, object] = {"step": content}
    if parent is not None:
        link["parent"] = parent
    if attempt:
        link["attempt"] = attempt
    return digest(link)


def content_digest(content: dict[str, object]) -> str:
    """A step's own content, without its place in the chain or its attempt (the ledger's prefix check)."""
    return digest(content)[:DIGEST_CHARS]


def external_task_id(namespace: str, index: int, chain: str) -> str:
    """`{ns}-s{i}-{chain[:16]}`: at most 40 + 5 + 17 = 62 characters of [a-z0-9-] (Kling allows 64)."""
    return f"{namespace}-s{index}-{chain[:DIGEST_CHARS]}"


def account_fingerprint(settings: KlingSettings) -> str:
    """Who pays: provider, API host and the key that names the account; 12 hex characters."""
    key = settings.cometapi_key if settings.provider == "cometapi" else settings.access_key
    secret = key.get_secret_value() if key is not None else ""
    return digest([settings.provider, settings.base_url, secret])[:12]


# ---- Prefect cache keys: explicit, versioned, made of ids and the account ----------------------------------


def submit_key(account: str, external_id: str) -> str:
    return f"kling/{CACHE_VERSION}/{account}/submit/{external_id}"


def wait_key(account: str, task_id: str) -> str:
    return f"kling/{CACHE_VERSION}/{account}/wait/{task_id}"


def store_key(account: str, task_id: str, resolved_dest: str, object_key: str) -> str:
    """Keyed on the *resolved* destination (absolute folder, bucket + prefix) and the object's key, so
    `./out` from two folders, or one task adopted by two jobs, are different stores."""
    where = hashlib.sha256(f"{resolved_dest.rstrip('/')}/{object_key}".encode()).hexdigest()[:DIGEST_CHARS]
    return f"kling/{CACHE_VERSION}/{account}/store/{task_id}/{where}"


def derived_key(work: str, account: str, inputs: list[str], resolved_dest: str, object_key: str) -> str:
    """Local work (a start frame, a stitch) is a function of the stored clips it reads: keyed on their sha256s
    and where its output goes, so the same clips at the same place are the same work."""
    made_from = digest(inputs)[:DIGEST_CHARS]
    where = hashlib.sha256(f"{resolved_dest.rstrip('/')}/{object_key}".encode()).hexdigest()[:DIGEST_CHARS]
    return f"kling/{CACHE_VERSION}/{account}/{work}/{made_from}/{where}"
