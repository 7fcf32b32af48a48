"""Users: the bootstrap admin, logins, and the admin's user management.

A user an admin disables can no longer log in, use a token issued before (both 403
``user_disabled``) or get or redeem a VNC token, and their live viewers close with 4403 on
every replica; the sessions they own keep running, so enabling them again picks up where
they were (with a new login: the tokens of before stay refused). Stop or delete the
sessions too when that is what is wanted.
"""

from __future__ import annotations

import logging
import os
import secrets
from datetime import datetime
from pathlib import Path

from pydantic import JsonValue, ValidationError

from streamspace_controlplane import auth
from streamspace_controlplane._errors import ApiError
from streamspace_controlplane.audit import audit
from streamspace_controlplane.core import ControlPlane
from streamspace_controlplane.models import ACTIVE_STATES, Role, User, utcnow
from streamspace_controlplane.services import tunnels
from streamspace_controlplane.store.base import Conflict, LastAdmin
from streamspace_sdk.errors import ConfigError
from streamspace_sdk.hooks import Principal

__all__ = [
    "ADMIN_PASSWORD_FILE",
    "MIN_PASSWORD_CHARS",
    "create_user",
    "delete_user",
    "ensure_admin",
    "list_users",
    "login",
    "update_user",
]

logger = logging.getLogger("streamspace.controlplane")

ADMIN_PASSWORD_FILE = "admin-password"
"""Name, under ``STREAMSPACE_HOME``, of the file holding a generated admin password."""

MIN_PASSWORD_CHARS = 8
"""Shortest password the API accepts for a new user."""


async def ensure_admin(cp: ControlPlane) -> str | None:
    """Make sure the bootstrap admin (``ADMIN_USERNAME``) exists.

    A missing admin is created with ``ADMIN_PASSWORD``, or, when that is unset, with a
    generated password written to ``STREAMSPACE_HOME/admin-password`` (mode 0600) and
    logged once. An existing admin gets ``ADMIN_PASSWORD`` when it is set and differs,
    so rotating the secret and restarting is how the password is reset.

    Returns:
        The generated password, or ``None`` when none was generated.
    """
    settings = cp.settings
    username = settings.admin_username
    configured = settings.admin_password.get_secret_value() if settings.admin_password else None
    existing = await cp.store.get_user(username)
    if existing is not None:
        if configured is not None and not await auth.verify_password(
            existing.password_hash, configured
        ):
            await cp.store.set_password(username, await auth.hash_password(configured))
            await audit(cp, "system", "user.password_reset", f"user/{username}")
            logger.info("Admin %r password updated from ADMIN_PASSWORD", username)
        return None

    password = configured if configured is not None else secrets.token_urlsafe(18)
    if len(password) < MIN_PASSWORD_CHARS:
        logger.warning(
            "ADMIN_PASSWORD is shorter than %d characters; choose a longer one",
            MIN_PASSWORD_CHARS,
        )
    try:
        user = User(username=username, role="admin", created_at=utcnow())
    except ValidationError as exc:
        raise ConfigError(f"ADMIN_USERNAME: {exc.errors()[0]['msg']} (got {username!r})") from None
    try:
        await cp.store.create_user(user, await auth.hash_password(password))
    except Conflict:
        return None  # another replica created it first
    await audit(cp, "system", "user.create", f"user/{username}", {"role": "admin"})
    if configured is not None:
        logger.info("Created admin %r from ADMIN_PASSWORD", username)
        return None
    path = _write_secret(settings.streamspace_home / ADMIN_PASSWORD_FILE, password)
    logger.warning("Generated admin password written to %s (user %r)", path, username)
    return password


def _write_secret(path: Path, secret: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Created 0600 before anything is written, so the secret is never readable by others.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        os.fchmod(file.fileno(), 0o600)
        file.write(secret + "\n")
    return path


async def login(
    cp: ControlPlane, username: str, password: str, client: str
) -> tuple[str, datetime]:
    """Check a user's password and return a token and its expiry.

    Raises:
        ApiError: 429 with ``Retry-After`` after too many failures for this username and
            client address; 401 for a wrong username or password (one message for both);
            403 ``user_disabled`` for the right password of a disabled user (only then, so
            the answer tells nobody without the password that the user exists).
    """
    throttle = auth.login_throttle(cp)
    throttle.check(username, client)
    user = await cp.store.get_user(username)
    if user is None:
        await auth.burn_password_check(password)
        ok = False
    else:
        ok = await auth.verify_password(user.password_hash, password)
    if user is None or not ok:
        throttle.failed(username, client)
        await audit(cp, "anonymous", "auth.login_failed", f"user/{username}", {"client": client})
        raise ApiError(401, "unauthorized", "wrong username or password")
    throttle.succeeded(username, client)
    if user.disabled:
        await audit(
            cp,
            "anonymous",
            "auth.login_refused",
            f"user/{user.username}",
            {"client": client, "reason": "disabled"},
        )
        raise auth.user_disabled(user.username)
    token, expires = auth.issue_token(
        cp.jwt_secret,
        user.username,
        user.role,
        cp.settings.jwt_ttl,
        claims={"epoch": user.token_epoch},
    )
    await audit(cp, user.username, "auth.login", f"user/{user.username}", {"client": client})
    return token, expires


async def list_users(cp: ControlPlane) -> list[User]:
    """Return every user, by name."""
    return await cp.store.list_users()


async def create_user(
    cp: ControlPlane,
    username: str,
    password: str,
    role: Role = "user",
    *,
    actor: Principal | str,
) -> User:
    """Create a user.

    Args:
        cp: The control plane.
        username: Login name (letters, digits, ``.``, ``_``, ``@``, ``-``).
        password: At least 8 characters.
        role: ``admin`` or ``user``.
        actor: The admin creating it, or a name such as ``cli``.

    Raises:
        ApiError: 422 for a bad name or a password under 8 characters; 409 if the name
            is taken.
    """
    _check_password(password)
    try:
        user = User(username=username, role=role, created_at=utcnow())
    except ValidationError as exc:
        raise ApiError(422, "validation_error", f"bad username: {exc.errors()[0]['msg']}") from None
    try:
        created = await cp.store.create_user(user, await auth.hash_password(password))
    except Conflict:
        raise ApiError(409, "conflict", f"user {username!r} already exists") from None
    actor_name = actor if isinstance(actor, str) else actor.username
    await audit(cp, actor_name, "user.create", f"user/{username}", {"role": role})
    return created


async def delete_user(cp: ControlPlane, actor: Principal, username: str) -> None:
    """Delete a user who holds no active sessions.

    Raises:
        ApiError: 409 when an admin deletes themselves or the user has sessions that are
            not stopped; 404 when there is no such user.
    """
    if username == actor.username:
        raise ApiError(409, "conflict", "you cannot delete your own user")
    if await cp.store.get_user(username) is None:
        raise ApiError(404, "not_found", f"no user {username!r}")
    active = await cp.store.count_sessions(user=username, states=sorted(ACTIVE_STATES))
    if active:
        raise ApiError(
            409,
            "conflict",
            f"user {username!r} has {active} session(s) that are not stopped; delete them first",
        )
    if not await cp.store.delete_user(username):
        raise ApiError(404, "not_found", f"no user {username!r}")
    await audit(cp, actor.username, "user.delete", f"user/{username}")
    await tunnels.revoke(cp, "user", username)  # e.g. an admin viewing others' sessions


async def update_user(
    cp: ControlPlane,
    actor: Principal,
    username: str,
    *,
    disabled: bool | None = None,
    role: Role | None = None,
    password: str | None = None,
) -> User:
    """Disable or enable a user, change their role or set their password.

    ``None`` leaves a field as it is; asking for what is already true changes nothing and
    is not audited. Disabling closes the user's live viewers on every replica (4403, "the
    user was disabled") and refuses their logins and tokens from then on; the sessions they
    own keep running. Disabling and a new password both cut off every token issued so far
    (enabling the user again does not bring those back: they log in anew). Demoting an
    admin closes their viewers too, since some may show other users' desktops.

    Raises:
        ApiError: 404 when there is no such user; 409 when admins disable or demote
            themselves, or when the change would leave no enabled admin; 422 for a
            password under 8 characters.
    """
    if password is not None:
        _check_password(password)
    user = await cp.store.get_user(username)
    if user is None:
        raise ApiError(404, "not_found", f"no user {username!r}")
    if username == actor.username:
        if disabled and not user.disabled:
            raise ApiError(409, "conflict", "you cannot disable your own user")
        if role is not None and role != user.role:
            raise ApiError(409, "conflict", "you cannot change your own role")
    changes: dict[str, JsonValue] = {}
    if disabled is not None and disabled != user.disabled:
        changes["disabled"] = disabled
    if role is not None and role != user.role:
        changes["role"] = role
    if changes:
        try:
            updated = await cp.store.update_user(
                username, role=role, disabled=disabled, revoke_tokens=bool(disabled)
            )
        except LastAdmin as exc:
            raise ApiError(409, "conflict", str(exc)) from None
        if updated is None:
            raise ApiError(404, "not_found", f"no user {username!r}")
    else:
        updated = user.model_copy(update={"password_hash": ""})
    if password is not None:
        if not await cp.store.set_password(username, await auth.hash_password(password)):
            raise ApiError(404, "not_found", f"no user {username!r}")
        changes["password"] = "changed"
    if not changes:
        return updated
    await audit(cp, actor.username, "user.update", f"user/{username}", changes)
    if changes.get("disabled"):
        await tunnels.revoke(cp, "user", username, reason="the user was disabled")
    elif changes.get("role") == "user":
        await tunnels.revoke(cp, "user", username, reason="the user is no longer an admin")
    return updated


def _check_password(password: str) -> None:
    """Refuse a password under :data:`MIN_PASSWORD_CHARS` with the API's 422."""
    if len(password) < MIN_PASSWORD_CHARS:
        raise ApiError(
            422,
            "validation_error",
            f"password must be at least {MIN_PASSWORD_CHARS} characters",
            fields=[{"field": "body.password", "message": "too short"}],
        )
