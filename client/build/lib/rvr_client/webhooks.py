"""Webhook signatures, Standard Webhooks convention (docs/webhooks.md in the rvr-serve repository).

A delivery carries `webhook-id`, `webhook-timestamp` (Unix seconds) and `webhook-signature`: a
space-separated list of `v1,<base64 HMAC-SHA256>` over `"{id}.{timestamp}.{body}"`, the body exactly
as sent. The key comes from the deployment's secret (`signing_key`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

SECRET_PREFIX = "whsec_"
DEFAULT_TOLERANCE_S = 300  # what Standard Webhooks libraries use: 5 minutes either way


class WebhookVerificationError(Exception):
    """The delivery is not authentic, or is too old or too new to accept."""


def _b64decode(text: str) -> bytes | None:
    """Canonical base64, padding optional (Standard Webhooks secrets are often unpadded); else None."""
    text = text.strip()
    if not text or len(text) % 4 == 1:
        return None
    padded = text + "=" * (-len(text) % 4)
    try:
        raw = base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if base64.b64encode(raw).decode() == padded else None


def signing_key(secret: str | bytes) -> bytes:
    """The HMAC key of a secret, the same rule on the sending and the receiving side:

    - `whsec_<base64>` (the Standard Webhooks form): the decoded bytes;
    - other text that is canonical base64 (e.g. `openssl rand -base64 32`): the decoded bytes, as
      Standard Webhooks libraries read an unprefixed secret;
    - any other text (a plain passphrase): its UTF-8 bytes;
    - bytes: used as they are.
    """
    if isinstance(secret, (bytes, bytearray)):
        key = bytes(secret)
    elif secret.startswith(SECRET_PREFIX):
        decoded = _b64decode(secret[len(SECRET_PREFIX) :])
        if decoded is None:
            raise ValueError("a whsec_ secret must be base64 after the prefix")
        key = decoded
    else:
        key = _b64decode(secret) or secret.encode()
    if not key:
        raise ValueError("the webhook secret is empty")
    return key


def sign(msg_id: str, timestamp: int, body: bytes | str, secret: str | bytes) -> str:
    """The `webhook-signature` value (one `v1,` signature) of a delivery."""
    raw = body.encode() if isinstance(body, str) else body
    content = f"{msg_id}.{timestamp}.".encode() + raw
    digest = hmac.new(signing_key(secret), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:  # a plain dict with other capitalisation
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    return value


def verify_webhook(
    headers: Mapping[str, str],
    body: bytes | str,
    secret: str | bytes,
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> dict[str, Any]:
    """Check a delivery and return its parsed JSON payload (`{type, timestamp, data}`).

    `headers`: the request's headers (any mapping; names case-insensitive). `body`: the raw request
    body, before any JSON parsing (re-serialised JSON would not match). Raises
    WebhookVerificationError when a header is missing or malformed, the timestamp is more than
    `tolerance_s` from `now` (replays), or no `v1` signature matches (compared in constant time).
    De-duplicate on `webhook-id`: a delivery may arrive more than once.
    """
    msg_id = _header(headers, "webhook-id")
    stamp = _header(headers, "webhook-timestamp")
    signatures = _header(headers, "webhook-signature")
    if not (msg_id and stamp and signatures):
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        timestamp = int(stamp.strip())
    except ValueError as exc:
        raise WebhookVerificationError("webhook-timestamp is not an integer") from exc
    current = time.time() if now is None else now
    if timestamp < current - tolerance_s:
        raise WebhookVerificationError("the delivery is too old")
    if timestamp > current + tolerance_s:
        raise WebhookVerificationError("the delivery's timestamp is in the future")
    raw = body.encode() if isinstance(body, str) else bytes(body)
    expected = base64.b64decode(sign(msg_id, timestamp, raw, secret)[3:])
    matched = False
    for entry in signatures.split():
        version, _, value = entry.partition(",")
        if version != "v1":
            continue  # other schemes (v1a: asymmetric) are not ours
        try:
            candidate = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            continue
        matched |= hmac.compare_digest(expected, candidate)
    if not matched:
        raise WebhookVerificationError("no matching signature")
    try:
        payload = json.loads(raw)
    except ValueError as exc:
        raise WebhookVerificationError("the body is not JSON") from exc
    return payload
