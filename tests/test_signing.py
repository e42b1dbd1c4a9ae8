"""Tests for bridge.signing: both signature schemes and the SecretKeeper (SPEC §2, §4, §6)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from bridge.signing import (
    SecretKeeper,
    SecretRotationError,
    SecretStoreError,
    decode_secret,
    generate_secret,
    hmac_sha256_signature,
    signature_headers,
    standard_webhooks_signature,
)

KEY = bytes(range(32))
SECRET = "whsec_" + base64.b64encode(KEY).decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"\xaa" * 32).decode()
BODY = b'{"device_id": "d1", "temp": 31.5}'
MSG_ID = "evt_01HZX3K9Q2"


def sw_headers(msg_id: str, ts: int, sig: str) -> dict[str, str]:
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": sig}


def now() -> int:
    return int(time.time())


class FakeClock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# ------------------------------------------------------------------ Standard Webhooks


def test_standard_webhooks_verifies_with_reference_package() -> None:
    ts = now()
    sig = standard_webhooks_signature([SECRET], MSG_ID, ts, BODY)
    assert sig.startswith("v1,") and " " not in sig
    assert Webhook(SECRET).verify(BODY, sw_headers(MSG_ID, ts, sig)) == json.loads(BODY)


def test_standard_webhooks_tampered_body_rejected() -> None:
    ts = now()
    sig = standard_webhooks_signature([SECRET], MSG_ID, ts, BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(BODY.replace(b"31.5", b"99.9"), sw_headers(MSG_ID, ts, sig))
    with pytest.raises(WebhookVerificationError):  # id and timestamp are signed too
        Webhook(SECRET).verify(BODY, sw_headers(MSG_ID + "x", ts, sig))
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(BODY, sw_headers(MSG_ID, ts + 1, sig))


def test_standard_webhooks_rotation_sends_both_signatures() -> None:
    ts = now()
    new, old = generate_secret(), generate_secret()
    sig = standard_webhooks_signature([new, old], MSG_ID, ts, BODY)
    parts = sig.split(" ")
    assert len(parts) == 2 and all(p.startswith("v1,") for p in parts)
    assert parts[0] == standard_webhooks_signature([new], MSG_ID, ts, BODY)  # newest first
    assert parts[1] == standard_webhooks_signature([old], MSG_ID, ts, BODY)
    for secret in (new, old):
        Webhook(secret).verify(BODY, sw_headers(MSG_ID, ts, sig))
    with pytest.raises(WebhookVerificationError):
        Webhook(OTHER_SECRET).verify(BODY, sw_headers(MSG_ID, ts, sig))


def test_standard_webhooks_exact_value() -> None:
    msg_id, ts, body = "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W", 1674087231, b'{"test": 2432232314}'
    # Written out from the spec: key = base64-decode(secret without "whsec_"),
    # content = id "." timestamp "." body, signature = "v1," base64(HMAC-SHA256(key, content)).
    signed_content = b"msg_2KWPBgLlAfxdpx2AI54pPJ85f4W" + b"." + b"1674087231" + b"." + body
    mac = hmac.new(KEY, signed_content, hashlib.sha256).digest()
    expected = "v1," + base64.b64encode(mac).decode()
    assert standard_webhooks_signature([SECRET], msg_id, ts, body) == expected
    # the same secret without the whsec_ prefix is plain base64 of the same key
    assert standard_webhooks_signature([SECRET[6:]], msg_id, ts, body) == expected
    # missing base64 padding is tolerated, like the reference verifier does
    unpadded = "whsec_" + base64.b64encode(b"k" * 31).decode().rstrip("=")
    assert decode_secret(unpadded) == b"k" * 31


def test_standard_webhooks_published_example() -> None:
    # The worked example of the Standard Webhooks / Svix documentation.
    sig = standard_webhooks_signature(
        ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        1614265330,
        b'{"test": 2432232314}',
    )
    assert sig == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_bad_secrets_rejected_without_leaking() -> None:
    bad = "whsec_not*base64!"
    with pytest.raises(ValueError) as err:
        standard_webhooks_signature([bad], MSG_ID, 1, BODY)
    assert "not*base64" not in str(err.value)
    with pytest.raises(ValueError):
        standard_webhooks_signature([], MSG_ID, 1, BODY)
    with pytest.raises(TypeError):
        standard_webhooks_signature(SECRET, MSG_ID, 1, BODY)
    with pytest.raises(ValueError):
        decode_secret("whsec_")


def test_generate_secret() -> None:
    s1, s2 = generate_secret(), generate_secret()
    assert s1 != s2
    assert s1.startswith("whsec_")
    assert len(base64.b64decode(s1[6:], validate=True)) == 32
    Webhook(s1)  # the reference package accepts its format


@settings(max_examples=200)
@given(
    body=st.text().map(str.encode),
    msg_id=st.text(min_size=1, max_size=80),
    offset=st.integers(min_value=-240, max_value=240),
    key=st.binary(min_size=1, max_size=64),
)
def test_standard_webhooks_property_reference_verifier(
    body: bytes, msg_id: str, offset: int, key: bytes
) -> None:
    # The reference verifier decodes the body as UTF-8 before verifying, so it can only
    # check UTF-8 bodies; arbitrary bytes are covered by the next test.
    secret = "whsec_" + base64.b64encode(key).decode()
    ts = now() + offset
    sig = standard_webhooks_signature([secret, OTHER_SECRET], msg_id, ts, body)
    Webhook(secret).verify(body, sw_headers(msg_id, ts, sig), json_parse=False)
    Webhook(OTHER_SECRET).verify(body, sw_headers(msg_id, ts, sig), json_parse=False)


@settings(max_examples=200)
@given(
    body=st.binary(),
    msg_id=st.text(min_size=1, max_size=80),
    ts=st.integers(min_value=0, max_value=2**40),
    key=st.binary(min_size=1, max_size=64),
)
def test_standard_webhooks_property_binary_bodies(
    body: bytes, msg_id: str, ts: int, key: bytes
) -> None:
    secret = "whsec_" + base64.b64encode(key).decode()
    version, b64 = standard_webhooks_signature([secret], msg_id, ts, body).split(",")
    expected = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    assert version == "v1"
    assert hmac.compare_digest(base64.b64decode(b64, validate=True), expected)


# ------------------------------------------------------------------ hmac-sha256 (Biotz)


def biotz_receiver(secret: str, header_value: str, body: bytes) -> bool:
    """A receiver written from the Biotz text: t=<ts>,v1=<hex HMAC-SHA256(secret, t.body)>."""
    pairs = [item.split("=", 1) for item in header_value.split(",")]
    timestamps = [value for name, value in pairs if name == "t"]
    if len(timestamps) != 1:
        return False
    signed = timestamps[0].encode() + b"." + body
    expected = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, value) for name, value in pairs if name == "v1")


def test_hmac_sha256_biotz_receiver() -> None:
    secret = "biotz-shared-secret"
    ts = 1_700_000_123
    header = hmac_sha256_signature([secret], ts, BODY)
    assert header.startswith(f"t={ts},v1=")
    assert biotz_receiver(secret, header, BODY)
    assert not biotz_receiver(secret, header, BODY + b" ")
    assert not biotz_receiver("wrong-secret", header, BODY)
    expected = hmac.new(b"biotz-shared-secret", b"1700000123." + BODY, hashlib.sha256).hexdigest()
    assert header == f"t=1700000123,v1={expected}"


def test_hmac_sha256_rotation_stripe_style() -> None:
    ts = 1_700_000_123
    header = hmac_sha256_signature(["new-secret", "old-secret"], ts, BODY)
    t_part, v_new, v_old = header.split(",")
    assert t_part == f"t={ts}" and v_new.startswith("v1=") and v_old.startswith("v1=")
    assert header == hmac_sha256_signature(["new-secret"], ts, BODY) + "," + v_old
    assert biotz_receiver("new-secret", header, BODY)
    assert biotz_receiver("old-secret", header, BODY)
    assert not biotz_receiver("third-secret", header, BODY)


def test_hmac_sha256_whsec_secret_is_used_as_given() -> None:
    # Documented choice: the key is the secret string as shown, whsec_ prefix included.
    ts = 1_700_000_123
    header = hmac_sha256_signature([SECRET], ts, BODY)
    expected = hmac.new(SECRET.encode(), b"1700000123." + BODY, hashlib.sha256).hexdigest()
    assert header == f"t=1700000123,v1={expected}"
    assert biotz_receiver(SECRET, header, BODY)


def test_signature_headers() -> None:
    ts = now()
    sw = signature_headers("standard-webhooks", "Ignored", [SECRET], MSG_ID, ts, BODY)
    assert sw == {"webhook-signature": standard_webhooks_signature([SECRET], MSG_ID, ts, BODY)}
    Webhook(SECRET).verify(BODY, {"webhook-id": MSG_ID, "webhook-timestamp": str(ts), **sw})
    hs = signature_headers("hmac-sha256", "Biotz-IoT-Signature", ["s3"], MSG_ID, ts, BODY)
    assert hs == {"Biotz-IoT-Signature": hmac_sha256_signature(["s3"], ts, BODY)}
    assert biotz_receiver("s3", hs["Biotz-IoT-Signature"], BODY)
    with pytest.raises(ValueError):
        signature_headers("md5", "X", [SECRET], MSG_ID, ts, BODY)
    with pytest.raises(ValueError):
        signature_headers("hmac-sha256", "", [SECRET], MSG_ID, ts, BODY)


# ------------------------------------------------------------------ SecretKeeper


def secrets_path(state_dir: Path) -> Path:
    return state_dir / "secrets.json"


def test_keeper_generates_and_persists(tmp_path: Path) -> None:
    state = tmp_path / "state"  # created on first write
    first = SecretKeeper(str(state)).secrets_for("cloud-ingest", None)
    assert len(first) == 1 and first[0].startswith("whsec_")
    assert len(decode_secret(first[0])) == 32
    keeper2 = SecretKeeper(str(state))
    assert keeper2.secrets_for("cloud-ingest", None) == first
    assert keeper2.show("cloud-ingest", None) == {
        "current": first[0],
        "previous": [],
        "source": "generated",
        "pending": None,
    }
    other = keeper2.secrets_for("other", None)
    assert other != first
    on_disk = json.loads(secrets_path(state).read_text())
    assert on_disk["cloud-ingest"]["current"] == first[0]
    assert on_disk["other"]["current"] == other[0]


def test_keeper_file_mode_0600(tmp_path: Path) -> None:
    path = secrets_path(tmp_path)
    path.write_text("{}")
    path.chmod(0o644)  # a permissive file left behind is replaced by a 0600 one
    keeper = SecretKeeper(str(tmp_path), clock=FakeClock())
    keeper.secrets_for("a", None)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    keeper.rotate("a", None)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_keeper_rotation_grace_then_drop(tmp_path: Path) -> None:
    clock = FakeClock()
    keeper = SecretKeeper(str(tmp_path), clock=clock)
    (old,) = keeper.secrets_for("wh", None)
    new = keeper.rotate("wh", None, grace=100)
    assert new != old and new.startswith("whsec_")
    assert keeper.secrets_for("wh", None) == [new, old]
    shown = keeper.show("wh", None)
    assert shown["current"] == new
    assert shown["previous"] == [{"secret": old, "expires_at": 1_700_000_100}]

    ts = now()
    sig = standard_webhooks_signature(keeper.secrets_for("wh", None), MSG_ID, ts, BODY)
    for secret in (old, new):
        Webhook(secret).verify(BODY, sw_headers(MSG_ID, ts, sig))

    clock.t += 99.5
    assert keeper.secrets_for("wh", None) == [new, old]
    assert SecretKeeper(str(tmp_path), clock=clock).secrets_for("wh", None) == [new, old]
    clock.t += 0.5  # reached expires_at
    assert keeper.secrets_for("wh", None) == [new]
    assert keeper.show("wh", None)["previous"] == []
    newer = keeper.rotate("wh", None)  # the next write prunes the expired one from disk
    assert keeper.secrets_for("wh", None) == [newer, new]
    assert old not in secrets_path(tmp_path).read_text()


def test_keeper_configured_secret(tmp_path: Path) -> None:
    clock = FakeClock()
    keeper = SecretKeeper(str(tmp_path), clock=clock)
    configured = OTHER_SECRET
    assert keeper.secrets_for("wh", configured) == [configured]
    assert keeper.show("wh", configured) == {
        "current": configured,
        "previous": [],
        "source": "config",
        "pending": None,
    }
    assert not secrets_path(tmp_path).exists()  # nothing generated for a configured secret

    with pytest.raises(SecretRotationError) as err:
        keeper.rotate("wh", configured, grace=3600)
    new = err.value.new_secret
    assert new.startswith("whsec_") and new != configured
    assert err.value.expires_at == 1_700_003_600
    for text in (str(err.value), repr(err.value)):
        assert new not in text and configured not in text
        assert new[6:] not in text and configured[6:] not in text
    assert "config" in str(err.value)

    # until the operator edits the config, the configured secret alone signs
    assert keeper.secrets_for("wh", configured) == [configured]
    assert keeper.show("wh", configured)["pending"] == new

    # the operator puts the new secret into the config: new and old both sign in the grace
    assert keeper.secrets_for("wh", new) == [new, configured]
    assert keeper.show("wh", new)["pending"] is None
    ts = now()
    sig = standard_webhooks_signature(keeper.secrets_for("wh", new), MSG_ID, ts, BODY)
    assert len(sig.split(" ")) == 2
    Webhook(configured).verify(BODY, sw_headers(MSG_ID, ts, sig))
    Webhook(new).verify(BODY, sw_headers(MSG_ID, ts, sig))
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(BODY, sw_headers(MSG_ID, ts, sig))

    clock.t += 3600
    assert keeper.secrets_for("wh", new) == [new]


def test_keeper_switch_from_configured_to_generated(tmp_path: Path) -> None:
    clock = FakeClock()
    keeper = SecretKeeper(str(tmp_path), clock=clock)
    with pytest.raises(SecretRotationError):
        keeper.rotate("wh", OTHER_SECRET)
    # the operator removes the secret from the config instead: a generated one takes over
    generated, previous = keeper.secrets_for("wh", None)
    assert generated.startswith("whsec_") and previous == OTHER_SECRET
    new = keeper.rotate("wh", None)
    assert keeper.secrets_for("wh", None) == [new, generated, OTHER_SECRET]
    assert keeper.show("wh", None)["pending"] is None


def test_keeper_sees_rotation_by_other_process(tmp_path: Path) -> None:
    daemon = SecretKeeper(str(tmp_path))
    cli = SecretKeeper(str(tmp_path))
    path = secrets_path(tmp_path)
    (old,) = daemon.secrets_for("wh", None)
    before = path.stat().st_mtime_ns
    new = cli.rotate("wh", None)
    os.utime(path, ns=(before + 5_000_000_000, before + 5_000_000_000))  # surely changed
    assert daemon.secrets_for("wh", None) == [new, old]
    assert daemon.show("wh", None)["current"] == new


def test_keeper_caches_unchanged_file(tmp_path: Path) -> None:
    keeper = SecretKeeper(str(tmp_path))
    (secret,) = keeper.secrets_for("wh", None)
    path = secrets_path(tmp_path)
    st_before = path.stat()
    # rewrite in place with a same-size secret and restore the mtime: the stat is unchanged,
    # so the keeper keeps its cached copy
    other = generate_secret()
    assert len(other) == len(secret)
    with open(path, "r+") as f:
        text = f.read().replace(secret, other)
        f.seek(0)
        f.write(text)
    os.utime(path, ns=(st_before.st_atime_ns, st_before.st_mtime_ns))
    assert keeper.secrets_for("wh", None) == [secret]
    # a changed mtime makes it re-read
    os.utime(path, ns=(st_before.st_atime_ns, st_before.st_mtime_ns + 1_000_000_000))
    assert keeper.secrets_for("wh", None) == [other]


def test_keeper_errors_do_not_leak_secrets(tmp_path: Path) -> None:
    path = secrets_path(tmp_path)
    leaked = "whsec_c2VjcmV0LXNob3VsZC1ub3QtbGVhaw=="
    path.write_text('{"wh": {"current": "' + leaked + '", "previous": [{"secret": 5}]}}')
    with pytest.raises(SecretStoreError) as err:
        SecretKeeper(str(tmp_path)).secrets_for("wh", None)
    assert leaked not in str(err.value) and "wh" in str(err.value)
    path.write_text('{"wh": {"current": "' + leaked + '"')  # truncated JSON
    with pytest.raises(SecretStoreError) as err:
        SecretKeeper(str(tmp_path)).secrets_for("wh", None)
    assert leaked not in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__
