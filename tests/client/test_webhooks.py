"""verify_webhook against signatures computed independently: the Standard Webhooks spec's example, the
reference `standardwebhooks` library, and HMAC written out here."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from datetime import datetime, timezone

import httpx
import pytest
from rvr_client import WebhookVerificationError, sign, signing_key, verify_webhook

# The example of the Standard Webhooks specification (and its reference libraries' tests).
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TS = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIG = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

BODY = json.dumps({"type": "completed", "timestamp": "2026-01-01T00:00:00Z", "data": {"id": "j1"}}).encode()


def _headers(msg_id: str, ts: int, sig: str) -> dict[str, str]:
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": sig}


def _hmac_sig(key: bytes, msg_id: str, ts: int, body: bytes) -> str:
    mac = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def test_spec_example_verifies():
    payload = verify_webhook(_headers(SPEC_ID, SPEC_TS, SPEC_SIG), SPEC_BODY, SPEC_SECRET, now=SPEC_TS + 10)
    assert payload == {"test": 2432232314}
    assert sign(SPEC_ID, SPEC_TS, SPEC_BODY, SPEC_SECRET) == SPEC_SIG


def test_reference_library_signatures_verify_and_ours_verify_there():
    standardwebhooks = pytest.importorskip("standardwebhooks")
    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    ref = standardwebhooks.Webhook(secret)
    ts = int(time.time())
    ref_sig = ref.sign("msg_1", datetime.fromtimestamp(ts, tz=timezone.utc), BODY.decode())
    assert verify_webhook(_headers("msg_1", ts, ref_sig), BODY, secret)["data"] == {"id": "j1"}
    ours = sign("msg_2", ts, BODY, secret)
    assert ref.verify(BODY, _headers("msg_2", ts, ours))["type"] == "completed"
    # Unprefixed base64, and unpadded, read the way the reference library reads them.
    for text in (secret[len("whsec_") :], secret[len("whsec_") :].rstrip("=")):
        assert verify_webhook(_headers("msg_1", ts, ref_sig), BODY, text)
        assert verify_webhook(_headers("msg_1", ts, ref_sig), BODY, "whsec_" + text)


def test_plain_secret_is_its_utf8_bytes():
    secret = "not base64: a passphrase!"
    ts = int(time.time())
    sig = _hmac_sig(secret.encode(), "m", ts, BODY)
    assert verify_webhook(_headers("m", ts, sig), BODY, secret)
    assert signing_key(secret) == secret.encode()
    assert signing_key(b"raw-bytes") == b"raw-bytes"
    with pytest.raises(ValueError):
        signing_key("whsec_not*base64")
    with pytest.raises(ValueError):
        signing_key("")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda h, b: (h, b + b" "),  # body changed
        lambda h, b: ({**h, "webhook-id": "msg_other"}, b),  # id changed: replayed under another id
        lambda h, b: ({**h, "webhook-timestamp": str(int(h["webhook-timestamp"]) + 1)}, b),
        lambda h, b: ({**h, "webhook-signature": "v1," + base64.b64encode(b"x" * 32).decode()}, b),
        lambda h, b: ({**h, "webhook-signature": h["webhook-signature"].replace("v1,", "v2,")}, b),
        lambda h, b: ({**h, "webhook-signature": "v1,@@notbase64@@"}, b),
        lambda h, b: ({k: v for k, v in h.items() if k != "webhook-signature"}, b),
        lambda h, b: ({k: v for k, v in h.items() if k != "webhook-id"}, b),
        lambda h, b: ({**h, "webhook-timestamp": "soon"}, b),
    ],
)
def test_tampered_or_incomplete_deliveries_are_refused(mutate):
    ts = int(time.time())
    key = b"0123456789abcdef0123456789abcdef"
    headers = _headers("msg_1", ts, _hmac_sig(key, "msg_1", ts, BODY))
    assert verify_webhook(headers, BODY, key)
    bad_headers, bad_body = mutate(headers, BODY)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(bad_headers, bad_body, key)


def test_wrong_secret_is_refused():
    ts = int(time.time())
    headers = _headers("m", ts, _hmac_sig(b"right", "m", ts, BODY))
    with pytest.raises(WebhookVerificationError, match="no matching signature"):
        verify_webhook(headers, BODY, b"wrong")


def test_timestamp_tolerance_both_ways():
    key = b"secret-key-bytes"
    now = 1_800_000_000
    for ts, ok in ((now - 299, True), (now + 299, True), (now - 301, False), (now + 301, False)):
        headers = _headers("m", ts, _hmac_sig(key, "m", ts, BODY))
        if ok:
            assert verify_webhook(headers, BODY, key, now=now)
        else:
            with pytest.raises(WebhookVerificationError, match=r"too old|future"):
                verify_webhook(headers, BODY, key, now=now)
    old = now - 3600
    headers = _headers("m", old, _hmac_sig(key, "m", old, BODY))
    assert verify_webhook(headers, BODY, key, now=now, tolerance_s=7200)


def test_any_one_of_several_signatures_and_other_versions_ignored():
    """Secret rotation: the sender signs with old and new keys, space-separated."""
    ts = int(time.time())
    new, old = b"new-key-new-key", b"old-key-old-key"
    sigs = " ".join(
        ["v1a,bm90LWFuLWVkMjU1MTktc2ln", _hmac_sig(old, "m", ts, BODY), _hmac_sig(new, "m", ts, BODY)]
    )
    assert verify_webhook(_headers("m", ts, sigs), BODY, new)
    assert verify_webhook(_headers("m", ts, sigs), BODY, old)
    with pytest.raises(WebhookVerificationError):
        verify_webhook(_headers("m", ts, sigs), BODY, b"third-key")


def test_header_names_are_case_insensitive_and_str_bodies_work():
    ts = int(time.time())
    key = b"k" * 24
    sig = _hmac_sig(key, "m", ts, BODY)
    title = {"Webhook-Id": "m", "Webhook-Timestamp": str(ts), "Webhook-Signature": sig}
    assert verify_webhook(title, BODY, key)
    assert verify_webhook(httpx.Headers(title), BODY.decode(), key)


def test_a_signed_non_json_body_is_refused():
    ts = int(time.time())
    body = b"<html>not json</html>"
    with pytest.raises(WebhookVerificationError, match="not JSON"):
        verify_webhook(_headers("m", ts, _hmac_sig(b"key", "m", ts, body)), body, b"key")
