"""Run an iterator in a background thread so reading/decoding overlaps tokenization.

`tokenizers` and SentencePiece release the GIL while encoding, so the reader thread makes progress
on parsing the next batch meanwhile.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
_DONE = object()


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yield `items` in order, produced up to `depth` ahead; the producer's exceptions re-raise here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(x: object) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for x in items:
                if not put(x):
                    return
        except BaseException as exc:  # handed to the consumer, which raises it
            put(_Failed(exc))
            return
        put(_DONE)

    thread = threading.Thread(target=work, name="bifocal-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            x = q.get()
            if x is _DONE:
                return
            if isinstance(x, _Failed):
                raise x.exc
            yield x
    finally:
        stop.set()  # consumer stopped (done, error, or closed early): let the producer exit
        thread.join(timeout=5)
