"""The committer that makes staged flow batches durable off the event loop."""

from __future__ import annotations

import asyncio
import threading
from functools import partial

import pytest

from bulkhead.server.services.flow_batches import Committer


def test_each_request_gets_its_own_commit_result() -> None:
    committer = Committer()
    threads: set[str] = set()

    def commit_of(n: int) -> int:
        threads.add(threading.current_thread().name)
        return n

    async def main() -> list[int]:
        return await asyncio.gather(*(committer.commit(partial(commit_of, n))
                                      for n in range(200)))

    assert asyncio.run(main()) == list(range(200))
    assert threads == {"flow-commit"}  # never the event loop's thread


def test_a_failed_commit_fails_only_its_request_and_the_committer_goes_on() -> None:
    committer = Committer()

    def broken() -> int:
        raise OSError("fsync failed")

    async def main() -> tuple[tuple[object, ...], int]:
        results = await asyncio.gather(committer.commit(lambda: 1), committer.commit(broken),
                                       committer.commit(lambda: 3), return_exceptions=True)
        return tuple(results), await committer.commit(lambda: 4)

    results, after = asyncio.run(main())
    assert results[0] == 1 and results[2] == 3
    assert isinstance(results[1], OSError) and str(results[1]) == "fsync failed"
    assert after == 4


def test_a_request_that_goes_away_does_not_stop_the_commit() -> None:
    """A cancelled request's batch is still made durable (a retry finds it stored)."""
    committer = Committer()
    started, release = threading.Event(), threading.Event()
    committed: list[int] = []

    def slow() -> int:
        started.set()
        release.wait(10)
        committed.append(1)
        return 1

    async def main() -> int:
        waiting = asyncio.ensure_future(committer.commit(slow))
        await asyncio.to_thread(started.wait, 10)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        release.set()
        return await committer.commit(lambda: 2)

    assert asyncio.run(main()) == 2
    assert committed == [1]


def test_requests_from_several_event_loops_are_woken_on_their_own() -> None:
    committer = Committer()
    results: dict[int, list[int]] = {}

    def run(k: int) -> None:
        async def main() -> list[int]:
            return await asyncio.gather(*(committer.commit(partial(int, k * 100 + i))
                                          for i in range(20)))
        results[k] = asyncio.run(main())

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {k: [k * 100 + i for i in range(20)] for k in range(4)}
