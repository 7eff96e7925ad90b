"""Micro-batching: concurrent requests become one encoder call and one index search.

One worker thread owns the Searcher. Each request is cut into pieces of at most `max_batch` queries (a 1024-query
request is 16 encoder calls of 64, not one of 1024). The worker takes the oldest piece, then greedily adds pieces
that are already queued (and, if the batch is still short, waits until `max_wait_s` after the oldest one arrived)
while the total stays within `max_batch` queries, so small requests ride along with the tail of a large one.
`max_batch=1` turns batching off: every encoder call holds one query. Under load the wait is already spent in the
queue, so batching adds no latency; at low load it adds at most `max_wait_s`. A request's result is delivered when
its last piece is done.
"""

import collections
import concurrent.futures
import dataclasses
import queue
import threading
import time

import numpy as np

from retrieval_service.searcher import Searcher


class DeadlineExceeded(Exception):
    """The request's deadline passed while it waited in the queue; it was never computed."""


class Overloaded(Exception):
    """The queue is full; the caller should retry later (gRPC RESOURCE_EXHAUSTED, HTTP 503)."""


@dataclasses.dataclass
class Job:
    kind: str                  # "retrieve" | "embed"
    texts: list[str]
    top_k: int = 0             # retrieve
    as_passages: bool = False  # embed
    deadline: float = float("inf")  # time.monotonic()
    enqueued: float = 0.0
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    results: list | np.ndarray | None = None  # filled piece by piece
    pieces_left: int = 0

    def batch_key(self):
        return (self.kind, self.as_passages)


@dataclasses.dataclass
class Piece:
    """Queries [start, end) of a job: what one batch slot holds."""
    job: Job
    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start


def _settle(future: concurrent.futures.Future, result=None, error: BaseException | None = None) -> None:
    """Sets a future unless its caller already gave up on it (cancelled after its deadline)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


class BatchStats:
    """Request latencies and batch sizes; a log line per `every_s` of traffic; totals for Health."""

    def __init__(self, *, every_s: float = 10.0, log=print):
        self.every_s, self.log = every_s, log
        self.requests_served = 0
        self.queries_served = 0
        self.batches_served = 0
        self._lock = threading.Lock()
        self._reset(time.monotonic())

    def _reset(self, now):
        self._window_start, self._latencies, self._queries, self._batches = now, [], 0, 0

    def record_batch(self, queries: int, finished: list[Job], now: float) -> None:
        """One encoder call + search of `queries` queries, which completed the requests `finished`."""
        with self._lock:
            self._batches += 1
            self._queries += queries
            self._latencies += [now - job.enqueued for job in finished]
            self.requests_served += len(finished)
            self.batches_served += 1
            self.queries_served += queries
            if now - self._window_start >= self.every_s and self._latencies:
                elapsed = now - self._window_start
                p50, p99 = np.percentile(self._latencies, [50, 99]) * 1e3
                self.log(f"[serve] {elapsed:.1f}s: {len(self._latencies)} requests, {self._queries} queries, "
                         f"{self._queries / elapsed:.1f} qps, latency p50 {p50:.1f} ms p99 {p99:.1f} ms, "
                         f"{self._queries / self._batches:.1f} queries/batch")
                self._reset(now)


_STOP = object()


class MicroBatcher:
    def __init__(self, searcher: Searcher, *, max_batch: int = 64, max_wait_s: float = 0.002,
                 max_queued: int = 4096, stats: BatchStats | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.searcher, self.max_batch, self.max_wait_s = searcher, max_batch, max_wait_s
        self.stats = stats or BatchStats()
        self._queue: queue.Queue = queue.Queue(maxsize=max_queued)
        self._held: collections.deque = collections.deque()  # pieces of jobs taken from the queue, oldest first
        self._worker = threading.Thread(target=self._run, name="micro-batcher", daemon=True)
        self._worker.start()

    def submit(self, job: Job) -> concurrent.futures.Future:
        job.enqueued = time.monotonic()
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Overloaded(f"{self._queue.maxsize} requests already queued") from None
        return job.future

    def close(self) -> None:
        self._queue.put(_STOP)
        self._worker.join(timeout=10)

    def _take_job(self, timeout):
        """The next queued job cut into pieces (held, oldest first); raises queue.Empty after `timeout` (None:
        wait forever, 0: do not wait)."""
        if timeout is None:
            job = self._queue.get()
        elif timeout <= 0:
            job = self._queue.get_nowait()
        else:
            job = self._queue.get(timeout=timeout)
        if job is _STOP:
            self._held.append(job)
            return
        job.pieces_left = -(-len(job.texts) // self.max_batch)
        self._held.extend(Piece(job, a, min(a + self.max_batch, len(job.texts)))
                          for a in range(0, len(job.texts), self.max_batch))

    def _next(self, timeout=None):
        if not self._held:
            self._take_job(timeout)
        return self._held.popleft()

    def _collect(self, first: Piece) -> list[Piece]:
        batch, size = [first], len(first)
        while size < self.max_batch:
            wait = first.job.enqueued + self.max_wait_s - time.monotonic()
            try:
                piece = self._next(timeout=max(wait, 0.0))
            except queue.Empty:
                break
            if piece is _STOP or piece.job.batch_key() != first.job.batch_key() or size + len(piece) > self.max_batch:
                self._held.appendleft(piece)
                break
            batch.append(piece)
            size += len(piece)
        return batch

    def _run(self) -> None:
        while True:
            first = self._next()
            if first is _STOP:
                return
            batch = [p for p in self._collect(first) if self._still_wanted(p.job)]
            if batch:
                self._process(batch)

    @staticmethod
    def _still_wanted(job: Job) -> bool:
        if job.future.done():  # cancelled by its caller, or failed in an earlier piece
            return False
        if time.monotonic() > job.deadline:
            _settle(job.future, error=DeadlineExceeded(
                f"deadline passed after {time.monotonic() - job.enqueued:.3f}s in the queue"))
            return False
        return True

    def _process(self, batch: list[Piece]) -> None:
        texts = [t for piece in batch for t in piece.job.texts[piece.start:piece.end]]
        try:
            if batch[0].job.kind == "retrieve":
                hits = self.searcher.retrieve(texts, max(piece.job.top_k for piece in batch))
                outputs = []
                for piece in batch:
                    part, hits = hits[:len(piece)], hits[len(piece):]
                    outputs.append([h[:piece.job.top_k] for h in part])
            else:
                vectors = self.searcher.embed(texts, as_passages=batch[0].job.as_passages)
                bounds = np.cumsum([0] + [len(piece) for piece in batch])
                outputs = [vectors[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        except Exception as e:  # a failing batch fails its requests, never the worker
            for piece in batch:
                _settle(piece.job.future, error=e)
            return
        finished = []
        for piece, output in zip(batch, outputs):
            job = piece.job
            if job.results is None:
                job.results = ([None] * len(job.texts) if job.kind == "retrieve"
                               else np.empty((len(job.texts), output.shape[1]), np.float32))
            job.results[piece.start:piece.end] = output
            job.pieces_left -= 1
            if job.pieces_left == 0:
                _settle(job.future, job.results)
                finished.append(job)
        self.stats.record_batch(len(texts), finished, time.monotonic())
