"""auth.py: password hashes, user tokens, the login throttle and agent tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import apikit
import jwt
import pytest

from streamspace_controlplane import auth
from streamspace_controlplane.http import ApiError
from streamspace_controlplane.models import User
from streamspace_controlplane.store.base import Store
from streamspace_sdk.testing.clock import FakeClock

SECRET = apikit.SECRET


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _claims(**overrides: object) -> dict[str, object]:
    now = int(datetime.now(UTC).timestamp())
    claims: dict[str, object] = {
        "sub": "alice",
        "role": "admin",
        "kind": "api",
        "iat": now,
        "exp": now + 600,
    }
    claims.update(overrides)
    return claims


# -- passwords ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_password_hash_is_argon2id_and_verifies() -> None:
    hashed = await auth.hash_password("correct horse")
    assert hashed.startswith("$argon2id$")
    assert await auth.verify_password(hashed, "correct horse")
    assert not await auth.verify_password(hashed, "wrong horse")


@pytest.mark.asyncio
async def test_a_malformed_hash_never_verifies() -> None:
    assert not await auth.verify_password("", "x")
    assert not await auth.verify_password("not-a-hash", "x")


@pytest.mark.asyncio
async def test_burn_password_check_completes() -> None:
    await auth.burn_password_check("anything")


# -- user tokens -------------------------------------------------------------------------


def test_issued_token_round_trips() -> None:
    now = datetime(2030, 1, 1, 12, 0, 0, 500_000, tzinfo=UTC)
    token, expires = auth.issue_token(SECRET, "alice", "user", 3600, now=now)
    assert expires == datetime(2030, 1, 1, 13, 0, tzinfo=UTC)
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "HS256"
    claims = jwt.decode(
        token, SECRET, algorithms=["HS256"], options={"verify_exp": False, "verify_iat": False}
    )
    assert claims["sub"] == "alice"
    assert claims["role"] == "user"
    assert claims["kind"] == "api"
    assert claims["exp"] - claims["iat"] == 3600


def test_decode_accepts_a_fresh_token() -> None:
    token, _ = auth.issue_token(SECRET, "alice", "admin", 60)
    assert auth.decode_token(SECRET, token)["sub"] == "alice"


def _refused(token: str, message: str = "token is invalid", kind: str = "api") -> None:
    with pytest.raises(ApiError) as info:
        auth.decode_token(SECRET, token, kind=kind)
    assert info.value.status == 401
    assert info.value.code == "unauthorized"
    assert message in info.value.message
    assert info.value.headers["WWW-Authenticate"].startswith("Bearer")


def test_expired_token_is_refused_without_leeway() -> None:
    past = datetime.now(UTC) - timedelta(seconds=62)
    token, _ = auth.issue_token(SECRET, "alice", "admin", 60, now=past)
    _refused(token, "expired")


def test_wrong_signature_is_refused() -> None:
    token, _ = auth.issue_token("o" * 40, "alice", "admin", 60)
    _refused(token)


def test_alg_none_is_refused() -> None:
    token = f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(_claims())}."
    _refused(token)


def hs512(claims: dict[str, object], secret: str) -> str:
    """Sign with HS512 by hand (pyjwt warns about our 40-byte test key for SHA-512)."""
    signing_input = f"{_b64({'alg': 'HS512', 'typ': 'JWT'})}.{_b64(claims)}"
    digest = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha512).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(digest).rstrip(b'=').decode()}"


def test_other_hmac_algorithms_are_refused() -> None:
    _refused(hs512(_claims(), SECRET))


def test_an_rs256_header_is_refused() -> None:
    # Algorithm confusion: a token claiming RS256 must never be checked with our HMAC key.
    signing_input = f"{_b64({'alg': 'RS256', 'typ': 'JWT'})}.{_b64(_claims())}"
    _refused(f"{signing_input}.{_b64({'sig': 'x'})}")


@pytest.mark.parametrize("missing", ["exp", "iat", "sub", "role", "kind"])
def test_a_token_missing_a_claim_is_refused(missing: str) -> None:
    claims = _claims()
    del claims[missing]
    _refused(jwt.encode(claims, SECRET, algorithm="HS256"))


def test_a_token_of_another_kind_is_refused() -> None:
    token, _ = auth.issue_token(SECRET, "alice", "user", 60, kind="vnc")
    _refused(token)
    assert auth.decode_token(SECRET, token, kind="vnc")["kind"] == "vnc"


@pytest.mark.parametrize("garbage", ["", "abc", "a.b.c", "Bearer x"])
def test_garbage_is_refused(garbage: str) -> None:
    _refused(garbage)


# -- the Authorization header ------------------------------------------------------------


def test_parse_bearer() -> None:
    assert auth.parse_bearer("Bearer abc.def") == "abc.def"
    assert auth.parse_bearer("bearer   abc ") == "abc"


@pytest.mark.parametrize("header", [None, "", "   "])
def test_missing_authorization_asks_for_a_bearer_token(header: str | None) -> None:
    with pytest.raises(ApiError) as info:
        auth.parse_bearer(header)
    assert info.value.status == 401
    assert info.value.headers == {"WWW-Authenticate": "Bearer"}


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer a b", "token"])
def test_malformed_authorization_is_refused(header: str) -> None:
    with pytest.raises(ApiError) as info:
        auth.parse_bearer(header)
    assert info.value.status == 401
    assert "invalid_request" in info.value.headers["WWW-Authenticate"]


# -- the login throttle ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_throttle_blocks_after_the_attempts_and_frees_after_the_window() -> None:
    clock = FakeClock()
    throttle = auth.LoginThrottle(3, 60.0, clock=clock)
    for _ in range(3):
        throttle.check("alice", "10.0.0.1")
        throttle.failed("alice", "10.0.0.1")
        await clock.advance(1)
    with pytest.raises(ApiError) as info:
        throttle.check("alice", "10.0.0.1")
    assert info.value.status == 429
    assert info.value.headers["Retry-After"] == "57"  # first failure at 0, now 3, window 60
    throttle.check("ALICE", "10.0.0.2")  # another address is not blocked
    throttle.check("bob", "10.0.0.1")  # nor another user
    with pytest.raises(ApiError):
        throttle.check("Alice", "10.0.0.1")  # names are compared case-insensitively
    await clock.advance(57)
    throttle.check("alice", "10.0.0.1")


def test_throttle_success_clears_the_failures() -> None:
    throttle = auth.LoginThrottle(2, 60.0, clock=FakeClock())
    throttle.failed("alice", "a")
    throttle.succeeded("alice", "a")
    throttle.failed("alice", "a")
    throttle.check("alice", "a")


def test_throttle_keeps_a_bounded_number_of_keys() -> None:
    throttle = auth.LoginThrottle(2, 60.0, clock=FakeClock(), max_keys=100)
    for index in range(1000):
        throttle.failed(f"user{index}", "a")
    assert len(throttle) == 100
    throttle.failed("user999", "a")
    with pytest.raises(ApiError):
        throttle.check("user999", "a")  # the most recent keys are the ones kept


@pytest.mark.asyncio
async def test_throttle_drops_expired_keys_before_recent_ones() -> None:
    clock = FakeClock()
    throttle = auth.LoginThrottle(1, 10.0, clock=clock, max_keys=2)
    throttle.failed("old", "a")
    await clock.advance(11)
    throttle.failed("new1", "a")
    throttle.failed("new2", "a")
    assert len(throttle) == 2
    with pytest.raises(ApiError):
        throttle.check("new1", "a")


# -- agent tokens ------------------------------------------------------------------------


def test_new_agent_token_shape_and_hash() -> None:
    token, record = auth.new_agent_token("k8s-prod")
    match = re.fullmatch(r"ssa_([0-9a-f]{16})_([A-Za-z0-9_-]{43})", token)
    assert match is not None, token
    assert match.group(1) == record.token_id
    assert record.agent_id == "k8s-prod"
    assert record.token_hash == hashlib.sha256(token.encode()).hexdigest() == auth.hash_token(token)
    assert token not in record.model_dump_json()
    assert record.token_hash not in record.model_dump_json()  # excluded from serialisation
    other, _ = auth.new_agent_token("k8s-prod")
    assert other != token


@pytest.mark.asyncio
async def test_authenticate_agent(store: Store, tmp_path: Path) -> None:
    cp = apikit.build(store, tmp_path)
    token, record = auth.new_agent_token("agent-1")
    await store.create_agent_token(record)
    found = await auth.authenticate_agent(cp, token)
    assert found.token_id == record.token_id
    assert found.agent_id == "agent-1"
    listed = await store.list_agent_tokens("agent-1")
    assert listed[0].last_used_at is not None

    messages = set()
    for bad in (None, "", "ssa_nope", token + "x", token.upper()):
        with pytest.raises(ApiError) as info:
            await auth.authenticate_agent(cp, bad)
        assert info.value.status == 401
        assert info.value.code == "unauthorized"
        messages.add(info.value.message)
    await store.revoke_agent_token(record.token_id, datetime.now(UTC))
    with pytest.raises(ApiError) as info:
        await auth.authenticate_agent(cp, token)
    messages.add(info.value.message)
    assert len(messages) == 1  # one generic answer for unknown, malformed and revoked


@pytest.mark.asyncio
async def test_authenticate_user_checks_the_store(store: Store, tmp_path: Path) -> None:
    cp = apikit.build(store, tmp_path)
    await store.create_user(User(username="carol", role="user"), "x")
    # The role comes from the store, not from the token.
    token, _ = auth.issue_token(cp.jwt_secret, "carol", "admin", 60)
    principal = await auth.authenticate_user(cp, token)
    assert (principal.username, principal.role) == ("carol", "user")
    # A token issued before the user (of that name) was created is refused.
    old = datetime.now(UTC) - timedelta(hours=1)
    stale, _ = auth.issue_token(cp.jwt_secret, "carol", "user", 7200, now=old)
    with pytest.raises(ApiError, match="no longer exists"):
        await auth.authenticate_user(cp, stale)
    await store.delete_user("carol")
    with pytest.raises(ApiError, match="no longer exists"):
        await auth.authenticate_user(cp, token)


@pytest.mark.asyncio
async def test_login_throttle_is_made_from_the_settings(store: Store, tmp_path: Path) -> None:
    cp = apikit.build(store, tmp_path, login_attempts=7, login_window=42.0)
    throttle = auth.login_throttle(cp)
    assert (throttle.attempts, throttle.window_s) == (7, 42.0)
    assert auth.login_throttle(cp) is throttle
