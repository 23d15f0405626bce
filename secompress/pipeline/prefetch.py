"""Load the next item in a background thread while the caller works on the current one.

A streamed pass reads decoder layer i+1 from the shards while layer i computes: the reads
(:mod:`secompress.direct_read`: ``os.preadv`` and ``memmove``) release the GIL, so on a CPU the
two overlap, and on a GPU the reads hide behind the device's compute. One item ahead at most:
memory grows by one item (one decoder layer), not more.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor


class Prefetcher:
    """``get(key, then=next_key)`` returns ``load(key)`` and starts ``load(next_key)`` in a background
    thread, so that the caller's next ``get(next_key)`` finds it read (or waits for the rest of it).

        with Prefetcher(read_layer) as pre:
            for i in order:
                tensors = pre.get(i, then=the index after i in order, or None)
                ...   # compute with layer i while layer `then` is read

    Loads run one at a time, in the order asked, and at most one runs or waits ahead of the caller.
    A ``get`` of a key other than the one read ahead drops that one (a load already running ends
    first) and loads the key asked. An exception
    raised by ``load(key)`` is raised by ``get(key)``. ``close`` (and leaving the block) waits for a
    running load, drops its result and ends the thread; ``get`` after ``close`` starts a new one.
    """

    def __init__(self, load: Callable[[Hashable], object]):
        self.load = load
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: tuple[Hashable, Future] | None = None

    def get(self, key: Hashable, then: Hashable | None = None):
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == key:
            fut = ahead[1]
        else:
            if ahead is not None:
                ahead[1].cancel()  # not started: never runs; running: its result is dropped when it ends
            fut = None
        if then is not None:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="secompress-prefetch")
            if fut is None:  # one load at a time: `key` first, then `then` behind it
                fut = self._pool.submit(self.load, key)
            self._ahead = (then, self._pool.submit(self.load, then))
        return fut.result() if fut is not None else self.load(key)

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead[1].cancel()
            self._ahead = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
