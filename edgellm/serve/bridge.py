"""The engine bridge: requests on the event loop, sequences on the engine thread.

Tokenizing, templating and compiling grammars run in worker threads (`to_thread`), so the loop never blocks.
Each request's sequences wake the loop after every record (`Sequence.on_put` -> `call_soon_threadsafe`) and the
request reads its own queues; there is no thread per request. A request that goes away (the client disconnects, a
stream is dropped, the timeout passes) cancels its unfinished sequences; the engine frees their blocks at its
next step."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from typing import AsyncIterator, Awaitable, Callable

import anyio

from ..engine.sequence import GenerationResponse, Sequence
from .metrics import engine_snapshot


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__("the server is busy: too many requests waiting")
        self.retry_after = retry_after


class RequestTimeout(Exception):
    pass


class ModelBridge:
    def __init__(self, name: str, llm, max_queue: int, owned: bool = True):
        self.name, self.llm, self.max_queue, self.owned = name, llm, max_queue, owned
        self.n_parallel = llm.core.scheduler.max_seqs
        self.active = 0   # sequences submitted and not yet finished or cancelled (touched on the loop only)
        self._woken: dict = {}   # loop -> the events of jobs with news since that loop last ran _wake
        self._lock = threading.Lock()

    def notify(self, loop, event: asyncio.Event) -> None:
        """On the engine thread, after a record is queued: wake the job's loop once for all the records and jobs
        of a step (one self-pipe write, not one per token and request). Never raises (the loop may be gone)."""
        with self._lock:
            events = self._woken.get(loop)
            if events is not None:       # a wake-up is on its way: it will set this one too
                events.add(event)
                return
            self._woken[loop] = {event}
        try:
            loop.call_soon_threadsafe(self._wake, loop)
        except RuntimeError:
            with self._lock:
                self._woken.pop(loop, None)

    def _wake(self, loop) -> None:
        with self._lock:
            events = self._woken.pop(loop, ())
        for e in events:
            e.set()

    async def run_sync(self, fn, *args):
        return await anyio.to_thread.run_sync(fn, *args)

    def snapshot(self) -> dict:
        """The engine's queue, batch and KV blocks (blocks the calling thread until the engine is between steps)."""
        return self.llm.runner.call(engine_snapshot)

    def submit(self, seqs: list[Sequence]) -> "Job":
        """Queue the sequences of one request (all or none), or raise QueueFull."""
        if self.active + len(seqs) > self.n_parallel + self.max_queue:
            raise QueueFull(retry_after=max(1, (self.active - self.n_parallel) // max(1, self.n_parallel)))
        job = Job(self, seqs)
        self.active += len(seqs)
        for seq in seqs:
            self.llm.runner.submit(seq)
        return job

    def close(self) -> None:
        if self.owned:
            self.llm.close()


class Job:
    """One request's sequences and the single event that wakes it."""

    def __init__(self, bridge: ModelBridge, seqs: list[Sequence]):
        self.bridge, self.seqs = bridge, seqs
        self.event = asyncio.Event()
        self.t0 = time.perf_counter()
        self.t_first: float | None = None
        self.done = [False] * len(seqs)
        self._released = False
        self.loop = loop = asyncio.get_running_loop()
        notify, event = bridge.notify, self.event

        def on_put():   # on the engine thread
            notify(loop, event)

        for seq in seqs:
            seq.on_put = on_put

    async def records(self, is_disconnected: Callable[[], Awaitable[bool]] | None = None,
                      deadline: float | None = None, poll: float = 0.5) -> AsyncIterator[tuple[int, GenerationResponse]]:
        """(choice index, record) as they come, over all sequences, until each has finished. An engine error
        raises; a disconnect ends the iteration; leaving early (or the deadline) cancels what is unfinished."""
        # the event also wakes the wait every `poll` (a client that left is noticed while nothing comes) and at the
        # deadline: one timer, not one per token
        self._timer = self.loop.call_later(poll, self._tick, poll)
        at_deadline = None if deadline is None else \
            self.loop.call_at(self.loop.time() + max(0.0, deadline - time.monotonic()), self.event.set)
        try:
            next_check = time.monotonic() + poll
            while not all(self.done):
                self.event.clear()
                got = False
                for i, seq in enumerate(self.seqs):
                    while not self.done[i]:
                        try:
                            r = seq.out.get_nowait()
                        except queue.Empty:
                            break
                        got = True
                        if isinstance(r, BaseException):
                            self.done[i] = True
                            raise r
                        if self.t_first is None and (r.token is not None or r.finish_reason):
                            self.t_first = time.perf_counter()
                        if r.finish_reason is not None:
                            self.done[i] = True
                        yield i, r
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise RequestTimeout("the request took longer than the server's timeout")
                if now >= next_check:   # also while tokens flow: a client that left is noticed within `poll`
                    next_check = now + poll
                    if is_disconnected is not None and await is_disconnected():
                        return
                if got:
                    continue
                await self.event.wait()
        finally:
            self._timer.cancel()
            if at_deadline is not None:
                at_deadline.cancel()
            self.release()

    def _tick(self, poll: float) -> None:
        self.event.set()
        self._timer = self.loop.call_later(poll, self._tick, poll)

    def release(self) -> None:
        """Cancel what has not finished; give the queue places back (once)."""
        if self._released:
            return
        self._released = True
        for seq, done in zip(self.seqs, self.done):
            if not done:
                self.bridge.llm.runner.cancel(seq)
        self.bridge.active -= len(self.seqs)
