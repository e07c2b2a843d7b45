"""Per-key rate limits: a token bucket per API key, kept in Redis so that every gateway
process draws on the same bucket.

A bucket holds up to `burst` tokens and refills at `per_minute / 60` tokens a second; a
request takes one token or, when none is left, is refused with the seconds until one is
back. The whole check is one Lua script, so it is atomic across gateways, and it reads the
clock from Redis, so gateways whose clocks disagree still share one bucket.

When Redis cannot be reached the limiter lets the request through (fails open): keys are
checked in the database, so an outage of Redis must not lock every caller out of the read
routes that do not need it; the routes that do need Redis answer 503 by themselves.
"""

import logging
import math
import time
from dataclasses import dataclass

import redis

from app.errors import ServiceError
from app.settings import Settings

logger = logging.getLogger(__name__)

# KEYS[1]: the bucket; ARGV: refill rate (tokens/s), capacity. Returns {allowed, seconds
# until the next token}, the seconds as a string (Redis truncates Lua numbers to integers).
TAKE_TOKEN = """
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or capacity
local at = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - at) * rate)
local allowed = 0
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(capacity / rate) + 1)
return {allowed, tostring(wait)}
"""

OUTAGE_LOG_INTERVAL_S = 60.0
_last_outage_logged = -math.inf


@dataclass(frozen=True)
class RateLimit:
    """`per_minute` requests a minute on average, up to `burst` at once."""

    per_minute: int
    burst: int


def limit_for(per_minute: int | None, burst: int | None, settings: Settings) -> RateLimit | None:
    """A key's own limit when it has one, else the service's; None when unlimited (0)."""
    if per_minute is None:
        per_minute, burst = settings.rate_limit_per_minute, settings.rate_limit_burst
    if per_minute == 0:
        return None
    return RateLimit(per_minute=per_minute, burst=burst or per_minute)


def bucket_key(settings: Settings, key_id: str) -> str:
    return f"{settings.queue_prefix}:ratelimit:{key_id}"


def take_token(connection: redis.Redis, settings: Settings, key_id: str, limit: RateLimit) -> float | None:
    """Takes one request from the key's bucket: None when allowed, else the seconds until
    the next one would be. Allowed, too, when Redis does not answer (see the module)."""
    script = connection.register_script(TAKE_TOKEN)
    try:
        allowed, wait = script(keys=[bucket_key(settings, key_id)], args=[limit.per_minute / 60, limit.burst])
    except redis.exceptions.RedisError as exc:
        _log_outage(exc)
        return None
    return None if int(allowed) else float(wait)


def enforce(connection: redis.Redis, settings: Settings, key_id: str, limit: RateLimit | None) -> None:
    """429 with `Retry-After` (whole seconds, rounded up) when the key is over its limit."""
    if limit is None:
        return
    wait = take_token(connection, settings, key_id, limit)
    if wait is None:
        return
    retry_after = max(1, math.ceil(wait))
    raise ServiceError(
        429,
        "rate_limited",
        f"this API key is over its rate limit of {limit.per_minute} requests per minute (burst {limit.burst}); retry in {retry_after} s",
        headers={"Retry-After": str(retry_after)},
        limit_per_minute=limit.per_minute,
        burst=limit.burst,
        retry_after_s=retry_after,
    )


def _log_outage(exc: Exception) -> None:
    """Once a minute at most: every request would otherwise log the same outage."""
    global _last_outage_logged
    now = time.monotonic()
    if now - _last_outage_logged >= OUTAGE_LOG_INTERVAL_S:
        _last_outage_logged = now
        logger.warning("rate limits are not enforced: Redis does not answer (%s)", exc)
