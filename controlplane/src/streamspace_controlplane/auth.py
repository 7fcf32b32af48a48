"""Authentication: password hashes, user tokens (JWT), the failed-login throttle, agent tokens.

* Passwords are hashed with argon2id (argon2-cffi), off the event loop.
* User tokens are HS256 JWTs with ``sub``, ``role``, ``kind``, ``iat`` and ``exp``; only HS256
  is accepted, so ``alg: none`` and RS/HS confusion are refused, and there is no leeway.
  A token is only as good as its user: a token of a deleted user (or of an earlier user of
  the same name) is refused with 401, one of a disabled user with 403 ``user_disabled``
  (the token is sound, its holder may not act), one issued before the user's tokens were
  cut off (disabled, or a new password: the ``epoch`` claim is below the user's
  ``token_epoch``) with 401, and the role comes from the store, not from the token.
* Failed logins are counted per (username, client address) in memory; too many in the
  window are answered with 429 and ``Retry-After``.
* Agent tokens look like ``ssa_<token_id>_<secret>``: 256 random bits, of which only the
  SHA-256 is stored. A fast hash is enough for a random secret of that size.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import secrets
from collections import OrderedDict, deque
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import argon2
import jwt
from argon2.exceptions import InvalidHashError, VerificationError

from streamspace_controlplane._errors import ApiError
from streamspace_controlplane.core import ControlPlane
from streamspace_controlplane.models import AgentToken, Role, utcnow
from streamspace_sdk.clock import Clock, SystemClock
from streamspace_sdk.hooks import Principal

__all__ = [
    "AGENT_TOKEN_PREFIX",
    "JWT_ALGORITHM",
    "LOGIN_THROTTLE",
    "PASSWORD_HASHER",
    "LoginThrottle",
    "authenticate_agent",
    "authenticate_user",
    "burn_password_check",
    "decode_token",
    "hash_password",
    "hash_token",
    "issue_token",
    "login_throttle",
    "new_agent_token",
    "parse_bearer",
    "user_disabled",
    "verify_password",
]

JWT_ALGORITHM: Final = "HS256"
"""The only algorithm issued and accepted."""

AGENT_TOKEN_PREFIX: Final = "ssa_"
"""Agent tokens start with this, so secret scanners and people can tell what they are."""

LOGIN_THROTTLE: Final = "auth.login_throttle"
"""Key of the process's :class:`LoginThrottle` in ``ControlPlane.extras``."""

PASSWORD_HASHER = argon2.PasswordHasher()
"""argon2id with the library's defaults (RFC 9106 low-memory profile). Tests may swap in a
cheaper one; hashes record their parameters, so verification keeps working either way."""

_BEARER_CHALLENGE = "Bearer"
_REQUIRED_CLAIMS = ["exp", "iat", "sub", "role", "kind"]


# -- passwords ---------------------------------------------------------------------------


async def hash_password(password: str) -> str:
    """Return the argon2 hash of ``password``, computed in a worker thread."""
    return await asyncio.to_thread(PASSWORD_HASHER.hash, password)


async def verify_password(password_hash: str, password: str) -> bool:
    """Return whether ``password`` matches ``password_hash``; a malformed hash never does."""

    def verify() -> bool:
        try:
            return PASSWORD_HASHER.verify(password_hash, password)
        except (VerificationError, InvalidHashError):
            return False

    return await asyncio.to_thread(verify)


_dummy_hash: str | None = None


async def burn_password_check(password: str) -> None:
    """Spend the time of one verification, so an unknown username takes as long as a
    wrong password and login timing does not reveal which names exist."""
    global _dummy_hash
    if _dummy_hash is None:
        _dummy_hash = await hash_password(secrets.token_urlsafe(16))
    await verify_password(_dummy_hash, password)


# -- user tokens -------------------------------------------------------------------------


def issue_token(
    secret: str,
    username: str,
    role: Role,
    ttl_s: float,
    *,
    kind: str = "api",
    now: datetime | None = None,
    claims: dict[str, Any] | None = None,
) -> tuple[str, datetime]:
    """Return a signed token for ``username`` and when it expires.

    Args:
        secret: The HS256 key (``ControlPlane.jwt_secret``).
        username: The ``sub`` claim.
        role: The role at issue time (informative; the store's role is what counts).
        ttl_s: Seconds until it expires.
        kind: What the token is for: ``api`` for REST calls; other features (a VNC
            ticket) use their own kind, so one kind is never accepted for another.
        now: Issue time; the current time by default.
        claims: Extra claims (e.g. the session a VNC ticket is bound to).
    """
    issued = (now or utcnow()).replace(microsecond=0)
    expires = issued + timedelta(seconds=ttl_s)
    payload: dict[str, Any] = {
        **(claims or {}),
        "sub": username,
        "role": role,
        "kind": kind,
        "iat": int(issued.timestamp()),
        "exp": math.ceil(expires.timestamp()),
    }
    return jwt.encode(payload, secret, algorithm=JWT_ALGORITHM), expires


def decode_token(secret: str, token: str, *, kind: str = "api") -> dict[str, Any]:
    """Verify ``token`` and return its claims.

    Raises:
        ApiError: 401 when the token is malformed, not HS256, badly signed, expired,
            lacks a required claim or is of another ``kind``.
    """
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            secret,
            algorithms=[JWT_ALGORITHM],
            options={"require": _REQUIRED_CLAIMS},
            leeway=0,
        )
    except jwt.ExpiredSignatureError:
        raise _invalid_token("token has expired; log in again") from None
    except jwt.PyJWTError:
        raise _invalid_token("token is invalid") from None
    if claims.get("kind") != kind or not isinstance(claims.get("sub"), str):
        raise _invalid_token("token is invalid")
    return claims


async def authenticate_user(cp: ControlPlane, token: str) -> Principal:
    """Return who ``token`` belongs to, checking it against the store.

    Raises:
        ApiError: 401 when the token is invalid, its user was deleted (or deleted and
            created again after the token was issued), or its user's tokens were cut off
            since it was issued; 403 ``user_disabled`` when its user is disabled.
    """
    claims = decode_token(cp.jwt_secret, token)
    user = await cp.store.get_user(claims["sub"])
    if user is None or claims["iat"] < int(user.created_at.timestamp()):
        raise _invalid_token("token's user no longer exists")
    if user.disabled:
        raise user_disabled(user.username)
    if claims.get("epoch", 0) != user.token_epoch:
        raise _invalid_token("token was revoked (user disabled or password changed); log in again")
    return Principal(username=user.username, role=user.role)


def user_disabled(username: str) -> ApiError:
    """Return the 403 that refuses a disabled user, at login and on every token they hold."""
    return ApiError(
        403, "user_disabled", f"user {username!r} is disabled; an admin can enable it again"
    )


def parse_bearer(header: str | None) -> str:
    """Return the token of an ``Authorization: Bearer <token>`` header.

    Raises:
        ApiError: 401 with a ``WWW-Authenticate`` challenge when the header is missing
            or is not a bearer credential.
    """
    if not header or not header.strip():
        raise ApiError(
            401,
            "unauthorized",
            "authentication required: send Authorization: Bearer <token>",
            {"WWW-Authenticate": _BEARER_CHALLENGE},
        )
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise ApiError(
            401,
            "unauthorized",
            "malformed Authorization header: expected 'Bearer <token>'",
            {"WWW-Authenticate": f'{_BEARER_CHALLENGE} error="invalid_request"'},
        )
    return token


def _invalid_token(message: str) -> ApiError:
    return ApiError(
        401,
        "unauthorized",
        message,
        {"WWW-Authenticate": f'{_BEARER_CHALLENGE} error="invalid_token"'},
    )


# -- the failed-login throttle -----------------------------------------------------------


class LoginThrottle:
    """Counts failed logins per (username, client address) over a sliding window.

    Once ``attempts`` failures fall within ``window_s``, further logins for that key are
    refused (even with the right password) until the oldest failure leaves the window. A
    success clears the key. At most ``max_keys`` keys are kept, dropping the least recently
    failed first, so a flood of made-up names cannot exhaust memory.

    Args:
        attempts: Failures allowed in the window (``LOGIN_ATTEMPTS``).
        window_s: The window in seconds (``LOGIN_WINDOW``).
        clock: Time source; tests pass a fake one instead of sleeping.
        max_keys: Bound on the keys kept in memory.
    """

    def __init__(
        self,
        attempts: int,
        window_s: float,
        *,
        clock: Clock | None = None,
        max_keys: int = 10_000,
    ) -> None:
        self.attempts = attempts
        self.window_s = window_s
        self.clock: Clock = clock or SystemClock()
        self.max_keys = max_keys
        self._failures: OrderedDict[tuple[str, str], deque[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._failures)

    @staticmethod
    def _key(username: str, client: str) -> tuple[str, str]:
        return username.casefold(), client

    def _recent(self, key: tuple[str, str], now: float) -> deque[float] | None:
        failures = self._failures.get(key)
        if failures is None:
            return None
        while failures and failures[0] <= now - self.window_s:
            failures.popleft()
        if not failures:
            del self._failures[key]
            return None
        return failures

    def retry_after(self, username: str, client: str) -> float | None:
        """Return seconds until ``username`` may try again from ``client``, or ``None``."""
        now = self.clock.monotonic()
        failures = self._recent(self._key(username, client), now)
        if failures is None or len(failures) < self.attempts:
            return None
        return failures[0] + self.window_s - now

    def check(self, username: str, client: str) -> None:
        """Raise 429 with ``Retry-After`` if the key has used up its attempts.

        Raises:
            ApiError: 429 ``too_many_requests``.
        """
        wait = self.retry_after(username, client)
        if wait is not None:
            seconds = max(1, math.ceil(wait))
            raise ApiError(
                429,
                "too_many_requests",
                f"too many failed logins; try again in {seconds} s",
                {"Retry-After": str(seconds)},
            )

    def failed(self, username: str, client: str) -> None:
        """Count one failed login."""
        key = self._key(username, client)
        now = self.clock.monotonic()
        failures = self._recent(key, now)
        if failures is None:
            failures = deque(maxlen=self.attempts)
            self._failures[key] = failures
        failures.append(now)
        self._failures.move_to_end(key)
        self._evict(now)

    def succeeded(self, username: str, client: str) -> None:
        """Forget the key's failures after a good login."""
        self._failures.pop(self._key(username, client), None)

    def _evict(self, now: float) -> None:
        if len(self._failures) <= self.max_keys:
            return
        # Expired keys go first; then the least recently failed.
        for key in list(self._failures):
            self._recent(key, now)
        while len(self._failures) > self.max_keys:
            self._failures.popitem(last=False)


def login_throttle(cp: ControlPlane) -> LoginThrottle:
    """Return the process's login throttle, creating it from the settings on first use.

    Tests install their own (with a fake clock) as ``cp.extras[LOGIN_THROTTLE]``.
    """
    throttle = cp.extras.get(LOGIN_THROTTLE)
    if not isinstance(throttle, LoginThrottle):
        throttle = LoginThrottle(cp.settings.login_attempts, cp.settings.login_window)
        cp.extras[LOGIN_THROTTLE] = throttle
    return throttle


# -- agent tokens ------------------------------------------------------------------------


def hash_token(token: str) -> str:
    """Return the hex SHA-256 of a token (agent, VNC or stream): all that is kept of it."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_agent_token(agent_id: str) -> tuple[str, AgentToken]:
    """Make a token for ``agent_id``.

    Returns:
        The plaintext ``ssa_<token_id>_<secret>`` (shown once, never stored) and the
        record to store, which holds only its hash.
    """
    token_id = secrets.token_hex(8)
    token = f"{AGENT_TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
    record = AgentToken(
        token_id=token_id, agent_id=agent_id, token_hash=hash_token(token), created_at=utcnow()
    )
    return token, record


async def authenticate_agent(cp: ControlPlane, token: str | None) -> AgentToken:
    """Return the stored token an agent presents, and record its use.

    Unknown, malformed and revoked tokens get the same answer, so a caller learns nothing
    about which tokens exist.

    Raises:
        ApiError: 401 ``unauthorized``.
    """
    if token:
        record = await cp.store.find_agent_token(hash_token(token.strip()))
        if record is not None and record.revoked_at is None:
            await cp.store.touch_agent_token(record.token_id, datetime.now(UTC))
            return record
    raise ApiError(
        401,
        "unauthorized",
        "invalid or revoked agent token",
        {"WWW-Authenticate": f'{_BEARER_CHALLENGE} error="invalid_token"'},
    )
