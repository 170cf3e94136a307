"""A flood of 2,000 connections, one critical Predict each: every call gets an answer or a clear refusal.

Why: 2,000 callers opening a connection each at once made 7-128 calls end CANCELLED after
about a second, with no details, before any handler ran (ServerLive alone lost a few too; the
same flood on Triton lost none). The cause is in grpc-core, under grpc.aio: the server holds
calls the application has not asked for yet, and grpc.aio asks for one per method at a time;
past ``grpc.server.max_pending_requests`` (1000) of them, up to the hard limit (3000), core
cancels new ones at random (random early detection), and a call cancelled before it is
published answers CANCELLED with no message. ``start_server`` raises both limits well past
``max_concurrent_rpcs``, so a burst reaches grpc.aio, which answers it or refuses what is
over ``max_concurrent_rpcs`` with RESOURCE_EXHAUSTED "Concurrent RPC limit exceeded!".

Each caller is a channel of its own with a local subchannel pool, so each is its own TCP
connection (channels with equal arguments would otherwise share one).
"""

from __future__ import annotations

import asyncio
import pathlib
import resource
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from inferline.v1 import inference_pb2 as pb
from inferline.v1 import inference_pb2_grpc as pb_grpc
from tests.integration.router_fixtures import DEMO_KEY, ServerProcess, start_router

pytestmark = pytest.mark.requires_triton

CONNECTIONS = 2000
DEADLINE_S = 5.0
CONNECT_LIMIT_S = 15.0
"""Making the 2,000 connections must be over by then (about 1 s here)."""
AUTH = (("authorization", f"Bearer {DEMO_KEY}"),)
FILES_NEEDED = 2 * CONNECTIONS + 1024
"""Open files this process (2,000 client ends) and the router (2,000 server ends) may each need,
with room to spare for everything else they hold open."""


def raise_file_limit(needed: int) -> None:
    """Raise this process's soft RLIMIT_NOFILE to ``needed`` (the router started after inherits it).

    Raises AssertionError when the hard limit is lower: the flood cannot run on this machine.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    assert hard == resource.RLIM_INFINITY or hard >= needed, (
        f"the flood needs {needed} open files; the hard limit is {hard} (raise it: ulimit -Hn)"
    )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


@pytest.fixture(scope="module")
def flood_router(
    triton_server: Any, router_config: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A router of its own: the flood does not share one with other tests' state, and it is
    started after the file limit is raised."""
    raise_file_limit(FILES_NEEDED)
    router = start_router(triton_server, router_config, tmp_path_factory.mktemp("flood-router"))
    yield router
    code = router.stop()
    assert code == 0, f"router exited with {code}:\n{router.log_tail()}"


@dataclass(frozen=True, slots=True)
class Answer:
    code: grpc.StatusCode
    details: str
    elapsed_s: float


REQUEST = pb.PredictRequest(
    route="driver_ranking", traffic_class="critical", entities=[pb.EntityKey(name="driver_id", int64_value=1001)]
)


async def one_call(channel: grpc.aio.Channel) -> Answer:
    started = time.monotonic()
    try:
        await pb_grpc.InferenceStub(channel).Predict(REQUEST, timeout=DEADLINE_S, metadata=AUTH)
    except grpc.aio.AioRpcError as err:
        return Answer(err.code(), err.details() or "", time.monotonic() - started)
    return Answer(grpc.StatusCode.OK, "", time.monotonic() - started)


async def test_a_flood_of_connections_is_answered_or_clearly_refused(flood_router: ServerProcess) -> None:
    """The connections are made first, then every caller sends at once: the deadline then
    measures the router, not this process making 2,000 connections on the same CPUs (the
    calls still arrive together: without the fix 7-9 % of them were cancelled here)."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(flood_router.address, options=options) for _ in range(CONNECTIONS)]
    try:
        started = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in channels)), CONNECT_LIMIT_S)
        connect_s = time.monotonic() - started
        started = time.monotonic()
        answers = await asyncio.wait_for(asyncio.gather(*(one_call(c) for c in channels)), DEADLINE_S + 5)
        wall_s = time.monotonic() - started
    finally:
        await asyncio.gather(*(c.close() for c in channels))
    seen = Counter((a.code.name, a.details[:60]) for a in answers)
    slowest = max(a.elapsed_s for a in answers)
    print(
        f"\nflood: {CONNECTIONS} connections made in {connect_s:.1f} s; their calls took {wall_s:.1f} s "
        f"(slowest {slowest:.2f} s of the {DEADLINE_S} s deadline): {dict(seen)}"
    )
    unclear = [
        a
        for a in answers
        if not (a.code == grpc.StatusCode.OK or (a.code == grpc.StatusCode.RESOURCE_EXHAUSTED and a.details))
    ]
    assert not unclear, (
        f"{len(unclear)} of {CONNECTIONS} calls ended without an answer or a clear refusal: {dict(seen)}; "
        f"e.g. {unclear[0]}"
    )
    # And the router serves on afterwards.
    async with grpc.aio.insecure_channel(flood_router.address) as channel:
        response = await pb_grpc.InferenceStub(channel).Predict(REQUEST, timeout=DEADLINE_S, metadata=AUTH)
    assert response.predictions
