"""The ``redis`` lease: one key on a shared Redis, for HA agents on many hosts.

Layout, as the seed deployment guide shows it (``redis-cli GET lease:docker-agent-leader``):

* ``lease:<LEASE_KEY>``: JSON ``{"holder", "acquired", "expires", "renewed", "epoch"}``,
  times as ISO 8601 UTC strings, with a TTL (``PX``) of the lease duration, so Redis itself
  drops the lease of a holder that crashed.
* ``lease:<LEASE_KEY>:epoch``: the fencing-token counter, with no TTL: it outlives the lease
  and a release, so the epoch keeps growing.

Acquire, renew and release are one Lua script each (``EVALSHA``, loaded again after a Redis
restart), so reading, checking the holder and writing are atomic. Times come from Redis's
``TIME``: every replica sees one clock, and the injected clock does not drive expiry.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from urllib.parse import parse_qsl, urlsplit

import redis.asyncio as aioredis
import redis.exceptions as rexc
from pydantic import Field, SecretStr, field_validator
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from streamspace_sdk.clock import Clock
from streamspace_sdk.errors import ConfigError, LeaseError, LeaseLost
from streamspace_sdk.lease import Lease, LeaseRecord
from streamspace_sdk.redact import redact_url
from streamspace_sdk.settings import StreamSpaceSettings, driver_settings

__all__ = ["RedisLease"]

_TIMEOUT_S = 5.0
"""Connect and socket timeout. The elector bounds each call by its renew deadline anyway;
this only frees a connection to a Redis that stopped answering."""

_LUA_HELPERS = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- Milliseconds since 1970 as ISO 8601 UTC (Redis's Lua has no os.date).
local function iso(ms)
  local s = math.floor(ms / 1000)
  local days = math.floor(s / 86400)
  local rem = s - days * 86400
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return string.format('%04d-%02d-%02dT%02d:%02d:%02d.%03dZ', y, m, d,
    math.floor(rem / 3600), math.floor(rem / 60) % 60, rem % 60, ms % 1000)
end
-- Whether the record is the caller's: same holder, and same epoch when the caller knows it.
local function mine(rec, holder, epoch)
  return rec.holder == holder and (epoch == '' or tonumber(epoch) == rec.epoch)
end
"""

_ACQUIRE = (
    _LUA_HELPERS
    + """
-- KEYS: lease, epoch counter. ARGV: holder, duration in ms.
local now = now_ms()
local raw = redis.call('GET', KEYS[1])
local rec
if raw then
  rec = cjson.decode(raw)
  if rec.holder ~= ARGV[1] then return {0, raw} end
else
  -- A Redis without persistence loses the counter on restart, and the control plane
  -- refuses an epoch below the highest it saw: restart it from the server's time in ms,
  -- which is above any epoch handed out before (fewer than one change of holder per ms).
  if redis.call('EXISTS', KEYS[2]) == 0 then
    redis.call('SET', KEYS[2], string.format('%d', now))
  end
  rec = {holder = ARGV[1], epoch = redis.call('INCR', KEYS[2]), acquired = iso(now)}
end
rec.renewed = iso(now)
rec.expires = iso(now + tonumber(ARGV[2]))
raw = cjson.encode(rec)
redis.call('SET', KEYS[1], raw, 'PX', ARGV[2])
return {1, raw}
"""
)

_RENEW = (
    _LUA_HELPERS
    + """
-- KEYS: lease. ARGV: holder, duration in ms, epoch the caller holds ('' if unknown).
local raw = redis.call('GET', KEYS[1])
if not raw then return {0, ''} end
local rec = cjson.decode(raw)
if not mine(rec, ARGV[1], ARGV[3]) then return {0, raw} end
local now = now_ms()
rec.renewed = iso(now)
rec.expires = iso(now + tonumber(ARGV[2]))
raw = cjson.encode(rec)
redis.call('SET', KEYS[1], raw, 'PX', ARGV[2])
return {1, raw}
"""
)

_RELEASE = (
    _LUA_HELPERS
    + """
-- KEYS: lease. ARGV: holder, epoch the caller holds ('' if unknown). The counter stays.
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
if not mine(cjson.decode(raw), ARGV[1], ARGV[2]) then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""
)


class RedisLease(Lease):
    """A lease on a shared Redis (5.0 or newer; not Redis Cluster): HA across hosts.

    Acquire is ``SET NX PX`` made atomic with the epoch's ``INCR`` in one script; renew and
    release are scripts that act only if the stored holder (and the epoch this object
    acquired at, when it did) is the caller's. A failed connection raises
    :class:`~streamspace_sdk.errors.LeaseError` naming ``REDIS_URL`` without its password;
    the next call reconnects.
    """

    name = "redis"
    capabilities = frozenset({"exclusive"})

    class Settings(StreamSpaceSettings):
        """Settings of the ``redis`` lease, read from the environment."""

        redis_url: SecretStr
        """``redis://[[user]:password@]host[:port][/db]``, or ``rediss://`` for TLS. Secret,
        because it carries the password."""

        lease_key: str = Field(default="docker-agent-leader", min_length=1)
        """Name of the lease; the key is ``lease:<LEASE_KEY>``. The seed guide's default;
        give each HA agent (each ``AGENT_ID``) its own."""

        @field_validator("redis_url")
        @classmethod
        def _check_url(cls, value: SecretStr) -> SecretStr:
            # Messages never quote the URL: it may carry the password.
            parts = urlsplit(value.get_secret_value())
            if parts.scheme.lower() not in ("redis", "rediss"):
                raise ValueError(
                    f"must be a redis:// or rediss:// URL, not {parts.scheme or 'no'} scheme"
                )
            try:
                _ = parts.port  # raises on a port that is not a number
            except ValueError:
                raise ValueError("has a port that is not a number from 0 to 65535") from None
            if not parts.hostname:
                raise ValueError("names no host: use redis://[:password@]host[:port][/db]")
            if parts.path.strip("/") and not parts.path.strip("/").isdigit():
                raise ValueError("has a path that is not a database number")
            return value

    def __init__(
        self, settings: StreamSpaceSettings | None = None, *, clock: Clock | None = None
    ) -> None:
        settings = driver_settings(RedisLease.Settings, settings, "RedisLease")
        super().__init__(settings, clock=clock)
        self.config: RedisLease.Settings = settings
        secret = settings.redis_url.get_secret_value()
        self.url = redact_url(secret)
        """``REDIS_URL`` without its password, for messages."""
        self.key = f"lease:{settings.lease_key}"
        """The Redis key of the lease record."""
        self.epoch_key = f"{self.key}:epoch"
        """The Redis key of the epoch counter."""
        parts = urlsplit(secret)
        self._password = parts.password or dict(parse_qsl(parts.query)).get("password", "")
        try:
            # One quick retry, so that the first call after a Redis restart, on a pooled
            # connection that died, reconnects instead of failing; the elector retries more.
            self._redis = aioredis.Redis.from_url(
                secret,
                decode_responses=True,
                socket_timeout=_TIMEOUT_S,
                socket_connect_timeout=_TIMEOUT_S,
                retry=Retry(NoBackoff(), 1),
            )
            # Connections are made at the first call; build one now (no I/O) so that an
            # option in the URL's query that redis-py does not know fails at start-up.
            pool = self._redis.connection_pool
            pool.connection_class(**pool.connection_kwargs)
        except TypeError as exc:
            raise ConfigError(
                f"REDIS_URL: has an option redis-py does not take ({self._scrub(str(exc))})"
            ) from None
        except ValueError as exc:
            raise ConfigError(f"REDIS_URL: {self._scrub(str(exc))}") from None
        self._acquire_script = self._redis.register_script(_ACQUIRE)
        self._renew_script = self._redis.register_script(_RENEW)
        self._release_script = self._redis.register_script(_RELEASE)
        self._epochs: dict[str, int] = {}
        """The epoch each holder last acquired at through this object, until it releases:
        renew and release check it, so an object whose lease lapsed and was taken again
        under the same identity (by another object) can touch only its own."""

    async def _try_acquire(self, holder: str, duration_s: float) -> LeaseRecord | None:
        with self._errors("acquire"):
            ok, raw = await self._acquire_script(
                keys=[self.key, self.epoch_key], args=[holder, _ms(duration_s)]
            )
        if not ok:
            return None
        record = self._parse(raw)
        self._epochs[holder] = record.epoch
        return record

    async def _renew(self, holder: str, duration_s: float) -> LeaseRecord:
        epoch = self._epochs.get(holder)
        with self._errors("renew"):
            ok, raw = await self._renew_script(
                keys=[self.key], args=[holder, _ms(duration_s), "" if epoch is None else epoch]
            )
        if not ok:
            # The epoch is kept: a release after this must not clear a newer lease.
            if not raw:
                raise LeaseLost(f"{holder!r} no longer holds {self.key} at {self.url}: it lapsed")
            other = self._parse(raw)
            raise LeaseLost(
                f"{holder!r} no longer holds {self.key} at {self.url}: "
                f"{other.holder!r} holds it at epoch {other.epoch}"
            )
        record = self._parse(raw)
        self._epochs[holder] = record.epoch
        return record

    async def _release(self, holder: str) -> None:
        epoch = self._epochs.get(holder)
        with self._errors("release"):
            await self._release_script(
                keys=[self.key], args=[holder, "" if epoch is None else epoch]
            )
        self._epochs.pop(holder, None)

    async def _read(self) -> LeaseRecord | None:
        """Return the record, or ``None`` when nobody holds it (never taken, released or
        lapsed: Redis drops the key then)."""
        with self._errors("read"):
            raw = await self._redis.get(self.key)
        return None if raw is None else self._parse(raw)

    async def close(self) -> None:
        """Close the connections to Redis (the lease stays as it is)."""
        await self._redis.aclose()

    def _parse(self, raw: str) -> LeaseRecord:
        try:
            data = json.loads(raw)
            acquired = _time(data["acquired"])
            return LeaseRecord(
                holder=data["holder"],
                epoch=data.get("epoch", 0),  # a record of the seed's layout carries none
                acquired_at=acquired,
                renewed_at=_time(data["renewed"]) if "renewed" in data else acquired,
                expires_at=_time(data["expires"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise LeaseError(
                f"{self.key} at {self.url} does not hold a lease record ({exc})"
            ) from None

    def _scrub(self, text: str) -> str:
        return text.replace(self._password, "***") if self._password else text

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Turn redis-py's errors into :class:`LeaseError` naming the URL, not the password."""
        where = f"REDIS_URL {self.url}"
        try:
            yield
        except rexc.AuthenticationError as exc:
            raise LeaseError(
                f"could not {action} the lease: authentication failed at {where} "
                f"({self._scrub(str(exc))}); check the password in REDIS_URL"
            ) from exc
        except (rexc.ConnectionError, rexc.TimeoutError) as exc:
            raise LeaseError(
                f"could not {action} the lease: Redis at {where} is unreachable "
                f"({self._scrub(str(exc))})"
            ) from exc
        except rexc.ResponseError as exc:
            raise LeaseError(
                f"could not {action} the lease {self.key}: Redis at {where} answered "
                f"with an error ({self._scrub(str(exc))})"
            ) from exc
        except rexc.RedisError as exc:
            raise LeaseError(
                f"could not {action} the lease: {self._scrub(str(exc))} ({where})"
            ) from exc


def _ms(duration_s: float) -> int:
    return max(1, round(duration_s * 1000))


def _time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
