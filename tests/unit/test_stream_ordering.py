"""``KeyedDispatcher``: arrival order per key, other keys alongside, never more than the limit."""

from __future__ import annotations

import asyncio

from inferline.stream.ordering import KeyedDispatcher


async def test_jobs_of_one_key_run_in_submission_order_even_when_earlier_ones_are_slower() -> None:
    dispatcher = KeyedDispatcher(limit=8)
    gates = {i: asyncio.Event() for i in range(4)}
    done: list[int] = []

    def job(i: int):  # type: ignore[no-untyped-def]
        async def run() -> None:
            await gates[i].wait()
            done.append(i)

        return run

    for i in range(4):
        await dispatcher.submit("k", job(i))
    for i in reversed(range(4)):  # release the later ones first
        gates[i].set()
    await dispatcher.drain()
    assert done == [0, 1, 2, 3]


async def test_other_keys_run_while_one_key_waits() -> None:
    dispatcher = KeyedDispatcher(limit=8)
    blocked = asyncio.Event()
    other_ran = asyncio.Event()

    async def slow() -> None:
        await blocked.wait()

    async def other() -> None:
        other_ran.set()

    await dispatcher.submit("a", slow)
    await dispatcher.submit("b", other)
    await other_ran.wait()  # b finished although a has not
    assert dispatcher.in_flight == 1
    blocked.set()
    await dispatcher.drain()


async def test_submit_waits_while_the_limit_is_reached() -> None:
    dispatcher = KeyedDispatcher(limit=2)
    release = asyncio.Event()

    async def held() -> None:
        await release.wait()

    await dispatcher.submit("a", held)
    await dispatcher.submit("b", held)
    assert dispatcher.room == 0
    third = asyncio.create_task(dispatcher.submit("c", held))
    await asyncio.sleep(0)
    assert not third.done() and dispatcher.in_flight == 2  # the reader stops when full
    release.set()
    await third
    await dispatcher.drain()
    assert dispatcher.in_flight == 0 and dispatcher.room == 2


async def test_a_failed_job_does_not_stop_the_next_of_its_key() -> None:
    dispatcher = KeyedDispatcher(limit=4)
    ran: list[str] = []

    async def fails() -> None:
        raise RuntimeError("boom")

    async def after() -> None:
        ran.append("after")

    await dispatcher.submit("k", fails)
    await dispatcher.submit("k", after)
    await dispatcher.drain()
    assert ran == ["after"]
