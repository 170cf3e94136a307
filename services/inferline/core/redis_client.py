"""The one way inferline opens Redis: a client that fails fast rather than holding a request.

The score cache and the quota store both sit on the request path with a budget of a few
milliseconds, and both fall back locally when Redis is slow or away. So their client gives
up within ``timeout_s`` on connect and on every read, never retries (a retry would double
what a request can lose), and skips the CLIENT SETINFO round trip on each new connection.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.retry import Retry

REDIS_MAX_CONNECTIONS = 64
"""Pool bound: past it a call fails at once (the caller falls back) instead of opening yet another socket."""


def fail_fast_redis(url: str, timeout_s: float) -> aioredis.Redis:
    """A client for ``url``; create it inside the running loop that will use it (it stays bound to it)."""
    return aioredis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        max_connections=REDIS_MAX_CONNECTIONS,
        driver_info=None,
    )
