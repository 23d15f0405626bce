"""Work on the next item in a background thread while the caller works on the current one.

A streamed pass reads decoder layer i+1 from the shards while layer i computes: the reads
(:mod:`secompress.direct_read`) and torch copies release the GIL, so on a CPU the two overlap, and
on a GPU the reads hide behind the device's compute. One item ahead at most: memory grows by one
item (one decoder layer), not more.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor


class Prefetcher:
    """Runs ``load(i)`` for the next index of ``order`` in a background thread while the caller works
    on the current one: reading is plain file I/O and torch copies, which release the GIL.

        with Prefetcher(lambda i: read_layer(i), range(L)) as pre:
            for i in range(L):
                tensors = pre.get(i)   # load(i), waiting for it if it is still running; load(i+1) starts
                ...                    # compute with layer i, then drop it

    At most one result is loaded ahead of the one the caller holds, so peak memory grows by one
    ``load`` result (one decoder layer). ``get`` takes the indices in ``order``; an exception raised by
    ``load(i)`` is raised by ``get(i)``. Leaving the block waits for a running load and drops its result.
    """

    def __init__(self, load: Callable[[int], object], order: Iterable[int]):
        self.load, self.order = load, list(order)
        self._next = 0  # position in order of the next index get() takes
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="secompress-prefetch")
        self._ahead: dict[int, Future] = {}

    def get(self, i: int):
        if self._next >= len(self.order) or self.order[self._next] != i:
            raise ValueError(f"Prefetcher.get({i}): expected index "
                             f"{self.order[self._next] if self._next < len(self.order) else 'none (all taken)'}")
        fut = self._ahead.pop(i, None) or self._pool.submit(self.load, i)
        self._next += 1
        if self._next < len(self.order):  # queued behind load(i): starts once it is done
            j = self.order[self._next]
            self._ahead[j] = self._pool.submit(self.load, j)
        return fut.result()

    def close(self) -> None:
        for fut in self._ahead.values():
            fut.cancel()
        self._pool.shutdown(wait=True)
        self._ahead.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
