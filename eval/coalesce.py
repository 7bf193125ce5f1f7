"""Coalescing concurrent scoring requests into batched rollouts: the server's one model worker.

HTTP handlers run on an asyncio event loop; the model runs on one worker thread (one process
serves one device). A handler ``submit``s its items and awaits a future. The worker takes the
oldest job, then waits at most ``max_wait_s`` (counted from that job's arrival) for more jobs
until ``max_batch_items`` items are gathered, and scores all of them in one call
(``eval.batch.BatchScorer.score``: one batched rollout per token budget). Every item keeps its
own seed, so what a job gets does not depend on the jobs it was coalesced with.

Bounded everywhere:
- the queue holds at most ``max_queue_items`` items; a job that does not fit is refused at once
  (``Overloaded``: the server answers 503 with ``Retry-After``) instead of waiting unboundedly;
- a batch holds at most ``max_batch_items`` items (a larger single job runs alone);
- a job whose client went away (its future cancelled) before the worker took it is dropped;
  one that is already running finishes and its result is discarded;
- if a coalesced batch fails, each of its jobs is run alone, so one bad job fails only itself.

``stop()`` refuses new jobs, lets the worker finish every queued one, and joins it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


class Overloaded(Exception):
    """The queue is full (or the server is stopping): retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Job:
    items: list
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    arrived: float = field(default_factory=time.monotonic)


class Coalescer:
    """One worker thread that scores queued jobs in coalesced batches (see the module doc).

    ``score(items) -> results`` (one result per item, in order) runs on the worker thread only.
    """

    def __init__(
        self,
        score: Callable[[list], list],
        max_batch_items: int = 64,
        max_wait_s: float = 0.01,
        max_queue_items: int = 256,
    ) -> None:
        if max_batch_items < 1 or max_queue_items < 1 or max_wait_s < 0:
            raise ValueError("max_batch_items and max_queue_items must be ≥ 1 and max_wait_s ≥ 0")
        self.score = score
        self.max_batch_items, self.max_wait_s, self.max_queue_items = (
            max_batch_items,
            max_wait_s,
            max_queue_items,
        )
        self.jobs: deque[Job] = deque()
        self.queued_items = 0
        self.stopping = False
        self.cond = threading.Condition()
        # accepted: jobs queued; jobs, items, batches: scored; refused: answered 503; failed: raised
        self.stats = {
            "accepted": 0,
            "jobs": 0,
            "items": 0,
            "batches": 0,
            "largest_batch_items": 0,
            "refused": 0,
            "failed": 0,
        }
        self.thread = threading.Thread(target=self.run, name="judge-worker", daemon=True)

    def start(self) -> Coalescer:
        self.thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new jobs, finish the queued ones, join the worker."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(timeout)

    async def submit(self, items: list) -> list:
        """Queue ``items`` as one job and wait for its results; ``Overloaded`` if it does not fit."""
        loop = asyncio.get_running_loop()
        job = Job(items, loop.create_future(), loop)
        with self.cond:
            if self.stopping:
                self.stats["refused"] += 1
                raise Overloaded("the server is shutting down")
            if self.queued_items + len(items) > self.max_queue_items:
                self.stats["refused"] += 1
                raise Overloaded(
                    f"queue full ({self.queued_items} items waiting, at most {self.max_queue_items})"
                )
            self.jobs.append(job)
            self.queued_items += len(items)
            self.stats["accepted"] += 1
            self.cond.notify_all()
        return await job.future

    # ------------------------------------------------------------------ worker thread

    def take(self) -> list[Job] | None:
        """The next batch of jobs (oldest first, at most ``max_batch_items`` items unless one job is
        larger), after waiting up to ``max_wait_s`` from the oldest's arrival for it to fill;
        None once stopping with an empty queue."""
        with self.cond:
            while not self.jobs and not self.stopping:
                self.cond.wait()
            if not self.jobs:
                return None
            deadline = self.jobs[0].arrived + self.max_wait_s
            while self.queued_items < self.max_batch_items and not self.stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.cond.wait(remaining)
            batch, n = [], 0
            while self.jobs and (not batch or n + len(self.jobs[0].items) <= self.max_batch_items):
                job = self.jobs.popleft()
                self.queued_items -= len(job.items)
                batch.append(job)
                n += len(job.items)
            return batch

    def run(self) -> None:
        while (batch := self.take()) is not None:
            live = [job for job in batch if not job.future.cancelled()]  # a gone client's job is dropped
            if live:
                self.run_batch(live)

    def run_batch(self, jobs: list[Job]) -> None:
        items = [item for job in jobs for item in job.items]
        try:
            results = self.score(items)
        except Exception as e:  # noqa: BLE001 - reported to the jobs, never kills the worker
            if len(jobs) > 1:  # one bad job must not fail the others: run each alone
                for job in jobs:
                    self.run_batch([job])
                return
            self.stats["failed"] += 1
            settle(jobs[0], error=e)
            return
        self.stats["batches"] += 1
        self.stats["jobs"] += len(jobs)
        self.stats["items"] += len(items)
        self.stats["largest_batch_items"] = max(self.stats["largest_batch_items"], len(items))
        start = 0
        for job in jobs:
            settle(job, result=results[start : start + len(job.items)])
            start += len(job.items)


def settle(job: Job, result: list | None = None, error: BaseException | None = None) -> None:
    """Hand a result (or an error) to the job's future on its own event loop; a future whose
    client went away (cancelled) is left alone. Safe from any thread."""

    def resolve() -> None:
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

    try:
        job.loop.call_soon_threadsafe(resolve)
    except RuntimeError:  # the event loop has closed: nobody is waiting any more
        pass
