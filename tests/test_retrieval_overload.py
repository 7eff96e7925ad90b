"""The gRPC service under pressure, server side: a request that waits past the server's deadline gets
DEADLINE_EXCEEDED and is never computed, a full queue turns requests away with RESOURCE_EXHAUSTED, and either way
the server goes on serving.

A real gRPC server on loopback with the real micro-batcher and BM25 searcher, run in this process so that a test
can keep the searcher busy on demand: `HeldSearcher` serves every query with the real index, but a batch holding
the query HOLD waits until the test releases it (a slow backend, without timing luck).
"""

import threading

import grpc
import pytest

from retrieval_service.batcher import MicroBatcher
from retrieval_service.client import RetrievalClient, RetrievalUnavailable
from retrieval_service.searcher import Searcher
from retrieval_service.server import RetrievalService, ServiceLimits, make_grpc_server

HOLD = "hold the searcher"


class HeldSearcher:
    """The real Searcher; a batch that holds the query HOLD waits for `release` before it is searched."""

    def __init__(self, searcher: Searcher):
        self._searcher = searcher
        self.holding, self.release = threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self._searcher, name)

    def __len__(self):
        return len(self._searcher)

    def retrieve(self, texts, top_k):
        if HOLD in texts:
            self.holding.set()
            self.release.wait(timeout=60)
        return self._searcher.retrieve(texts, top_k)


@pytest.fixture(scope="module")
def bm25_searcher(bm25_index):
    return Searcher(bm25_index)


@pytest.fixture
def held_server(bm25_searcher):
    """Factory: (searcher, batcher, address) of a server with these ServiceLimits / MicroBatcher options."""
    started = []

    def start(*, request_timeout_s=30.0, max_queued=4096):
        searcher = HeldSearcher(bm25_searcher)
        batcher = MicroBatcher(searcher, max_batch=64, max_wait_s=0.002, max_queued=max_queued)
        server, port = make_grpc_server(RetrievalService(batcher, ServiceLimits(request_timeout_s=request_timeout_s)),
                                        host="127.0.0.1", port=0, max_workers=8)
        server.start()
        started.append((searcher, batcher, server))
        return searcher, batcher, f"127.0.0.1:{port}"

    yield start
    for searcher, batcher, server in started:
        searcher.release.set()
        server.stop(grace=None).wait()
        batcher.close()


def in_background(call):
    """Runs call() in a thread; -> (thread, outcome list that gets its result or exception)."""
    outcome = []

    def run():
        try:
            outcome.append(call())
        except Exception as error:  # the outcome under test
            outcome.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_a_request_past_the_server_deadline_gets_deadline_exceeded_is_never_computed_and_the_server_serves_on(
        held_server):
    searcher, batcher, address = held_server(request_timeout_s=0.5)
    with RetrievalClient(address, deadline_s=30.0, max_attempts=1) as client:
        held, held_outcome = in_background(lambda: client.retrieve([HOLD], 1))
        assert searcher.holding.wait(30)
        # The client would wait 30 s; the server gives up at its own 0.5 s cap and says so.
        with pytest.raises(RetrievalUnavailable, match=r"no result within 0\.500s") as error:
            client.retrieve(["capital of Peru"], 1)
        assert error.value.status == grpc.StatusCode.DEADLINE_EXCEEDED
        searcher.release.set()
        held.join(30)
        assert isinstance(held_outcome[0], RetrievalUnavailable)  # it too waited past 0.5 s
        assert client.retrieve(["capital of Kenya"], 1)[0][0].title == "Nairobi"
    # Batches computed: HOLD's and the last request's. The expired request was dropped from the queue unsearched.
    assert batcher.stats.requests_served == 2 and batcher.stats.queries_served == 2


def test_a_full_queue_turns_requests_away_with_resource_exhausted_and_the_server_serves_on(held_server):
    searcher, batcher, address = held_server(max_queued=2)
    with RetrievalClient(address, deadline_s=30.0, max_attempts=1) as client:
        held, held_outcome = in_background(lambda: client.retrieve([HOLD], 1))
        assert searcher.holding.wait(30)
        # The searcher is busy: two requests fit in the queue, the others are refused at once.
        waiting = [in_background(lambda i=i: client.retrieve([f"capital of Japan {i}"], 1)) for i in range(4)]
        for _ in range(400):
            if sum(not thread.is_alive() for thread, _ in waiting) >= 2:
                break
            threading.Event().wait(0.05)
        refused = [outcome[0] for thread, outcome in waiting if not thread.is_alive()]
        assert len(refused) == 2, refused
        for error in refused:
            assert isinstance(error, RetrievalUnavailable) and error.status == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "server overloaded: 2 requests already queued" in str(error)
        searcher.release.set()
        for thread, _ in [(held, held_outcome)] + waiting:
            thread.join(30)
        served = [outcome[0] for _, outcome in waiting if not isinstance(outcome[0], Exception)]
        assert [results[0][0].title for results in served] == ["Tokyo", "Tokyo"]  # the two queued ones were served
        assert client.retrieve(["capital of Chile"], 1)[0][0].title == "Santiago"
    assert batcher.stats.requests_served == 4  # HOLD, the two queued, the last one
