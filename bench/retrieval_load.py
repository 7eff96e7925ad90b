"""Retrieval service under a bounded loopback load, over gRPC and Search-R1's HTTP /retrieve, beside other servers.

    .venv/bin/python bench/retrieval_load.py                         # ours: gRPC + HTTP, micro-batched
    .venv/bin/python bench/retrieval_load.py --http-target search-r1,http://127.0.0.1:8000,PID   # + a peer
    .venv/bin/python bench/retrieval_load.py --unbatched              # + our server with --max-batch 1

A 20k-passage dense Flat index (all-MiniLM-L6-v2, short synthetic passages, `--docs`) is built once through the
real builder and cached under runs/bench_cache/ (corpus-N.jsonl next to it: build a peer's index from the same file).
The script first times the Flat search kernels on the index's own vectors (faiss-cpu's IndexFlatIP.search vs NumPy
matmul + argpartition), then starts our server and drives it, and every --http-target (any server speaking
Search-R1's POST /retrieve, started beforehand on the same corpus and encoder: Search-R1's own retrieval_server.py,
an older checkout of ours), with the same closed-loop load:
  (a) one-query requests at concurrency 1, 8, 32;  (b) 64-query requests at concurrency 1, 4,
each cell bounded by --cell-seconds and --cell-requests, targets interleaved cell by cell. HTTP clients keep their
connection alive (one per client thread). It checks first that every target returns the same top-3 ids for 50
queries, and prints QPS (queries/s), p50/p99 request latency, errors and each server's RSS. Last line:
`ratio=<our HTTP QPS / the first target's HTTP QPS, one-query requests at concurrency 32>` (with no target:
batched / unbatched gRPC QPS, which needs --unbatched). Runs in fp32 on CPU.
"""

import argparse
import http.client
import json
import pathlib
import urllib.parse
import random
import sys
import threading
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from retrieval_service.build_index import build_index, read_manifest  # noqa: E402
from retrieval_service.client import RetrievalClient, RetrievalError  # noqa: E402
from retrieval_service.encoder import default_encoder_dir  # noqa: E402

CELLS = [("a", 1, 1), ("a", 1, 8), ("a", 1, 32), ("b", 64, 1), ("b", 64, 4)]  # (load, queries/request, clients)


def whole_words(encoder_dir) -> list[str]:
    """Vocabulary entries that are plain lower-case words (one WordPiece token each): short, realistic passages."""
    vocab = (pathlib.Path(encoder_dir) / "vocab.txt").read_text().split("\n")
    return [w for w in vocab[2000:] if w.isalpha() and w.isascii() and len(w) >= 3]


def write_corpus(path: pathlib.Path, num_docs: int, words: list[str], seed: int = 0) -> None:
    rng = random.Random(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for i in range(num_docs):
            title = " ".join(rng.choice(words) for _ in range(2)).title()
            text = " ".join(rng.choice(words) for _ in range(rng.randint(30, 45))) + "."
            f.write(json.dumps({"id": str(i), "contents": f'"{title}"\n{text}'}) + "\n")
    tmp.replace(path)


def cached_index(cache: pathlib.Path, num_docs: int) -> pathlib.Path:
    cache.mkdir(parents=True, exist_ok=True)
    corpus = cache / f"corpus-{num_docs}.jsonl"
    index = cache / f"index-{num_docs}-minilm-flat"
    if (index / "manifest.json").exists() and read_manifest(index)["num_documents"] == num_docs:
        print(f"index: reusing {index}", flush=True)
        return index
    if not corpus.exists():
        write_corpus(corpus, num_docs, whole_words(default_encoder_dir()))
    print(f"index: building {index} from {corpus} (encodes {num_docs:,} passages; progress below)", flush=True)
    build_index(corpus, index, backend="dense", index_kind="flat", overwrite=True)
    return index


def time_call(fn, reps: int) -> float:
    fn()  # warm caches / threads
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def compare_flat_kernels(index_dir: pathlib.Path) -> str:
    """Times faiss IndexFlatIP.search against NumPy matmul + argpartition on the index's own vectors."""
    import faiss

    from retrieval_service.dense_index import INDEX_FILE, DenseSearcher

    numpy_searcher = DenseSearcher(index_dir / INDEX_FILE, "flat", flat_kernel="numpy")
    faiss_searcher = DenseSearcher(index_dir / INDEX_FILE, "flat", flat_kernel="faiss")
    rng = np.random.default_rng(0)
    print(f"flat search kernels over {len(numpy_searcher):,} x {numpy_searcher.dim} fp32 vectors, top-5, "
          f"faiss {faiss.__version__} ({faiss.omp_get_max_threads()} OpenMP threads) vs NumPy {np.__version__}:")
    speedups = []
    for batch in (1, 64):
        q = rng.standard_normal((batch, numpy_searcher.dim)).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        reps = 20 if batch == 1 else 5
        t_faiss = time_call(lambda: faiss_searcher.search(q, 5), reps)
        t_numpy = time_call(lambda: numpy_searcher.search(q, 5), reps)
        same = np.array_equal(faiss_searcher.search(q, 5)[1], numpy_searcher.search(q, 5)[1])
        speedups.append(t_faiss / t_numpy)
        print(f"  batch {batch:3d}: faiss-flat {t_faiss * 1e3:8.2f} ms   numpy-matmul-argpartition "
              f"{t_numpy * 1e3:8.2f} ms   faiss/numpy {t_faiss / t_numpy:5.2f}x   same top-5 ids: {same}")
    return "numpy" if np.prod(speedups) > 1.0 else "faiss"  # the faster one over both batch sizes


def query_pool(words, n=2000, seed=1) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 8))) for _ in range(n)]


def grpc_requester(address: str):
    """-> a per-thread factory of request functions (queries -> None, raises on failure) over gRPC."""
    def make():
        client = RetrievalClient(address, deadline_s=60.0)
        return lambda queries: client.retrieve(queries, 3), client.close
    return make


def http_requester(url: str):
    """-> a per-thread factory of request functions over HTTP/1.1 POST /retrieve, one kept-alive connection each."""
    parsed = urllib.parse.urlparse(url)

    def make():
        state = {"connection": None}

        def request(queries):
            body = json.dumps({"queries": queries, "topk": 3, "return_scores": True})
            for attempt in (0, 1):  # a connection the server closed is re-opened once
                if state["connection"] is None:
                    state["connection"] = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=120)
                try:
                    state["connection"].request("POST", "/retrieve", body, {"Content-Type": "application/json"})
                    response = state["connection"].getresponse()
                    payload = response.read()
                except (http.client.HTTPException, OSError):
                    state["connection"].close()
                    state["connection"] = None
                    if attempt:
                        raise
                    continue
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {payload[:200]!r}")
                return json.loads(payload)["result"]

        return request, lambda: state["connection"] and state["connection"].close()
    return make


def run_cell(requester, pool: list[str], per_request: int, clients: int, seconds: float, max_requests: int):
    """Closed-loop load: `clients` threads each send one request at a time. -> (queries/s, p50 ms, p99 ms, errors).

    requester: an address "host:port" (gRPC) or a factory from grpc_requester / http_requester.
    """
    make = grpc_requester(requester) if isinstance(requester, str) else requester
    latencies, errors, lock = [], [0], threading.Lock()
    issued, stop_at, go = [0], [0.0], threading.Event()

    def worker(seed):
        rng = random.Random(seed)
        request, close = make()
        try:
            request(rng.sample(pool, per_request))  # connect + warm before timing
            barrier.wait()
            go.wait()
            while time.perf_counter() < stop_at[0]:
                with lock:
                    if issued[0] >= max_requests:
                        return
                    issued[0] += 1
                queries = rng.sample(pool, per_request)
                t = time.perf_counter()
                try:
                    request(queries)
                except (RetrievalError, RuntimeError, OSError, http.client.HTTPException):
                    with lock:
                        errors[0] += 1
                    continue
                with lock:
                    latencies.append(time.perf_counter() - t)
        finally:
            close()

    barrier = threading.Barrier(clients + 1)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    stop_at[0] = start + seconds
    go.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    lat = np.asarray(latencies or [float("nan")]) * 1e3
    return len(latencies) * per_request / elapsed, np.percentile(lat, 50), np.percentile(lat, 99), errors[0]


def same_top3(targets: dict, pool: list[str]) -> dict:
    """Top-3 ids of 50 queries from every HTTP target, compared with the first: -> name -> queries agreeing."""
    queries = pool[:50]
    answers = {name: http_requester(url)()[0](queries) for name, (url, _) in targets.items()}
    first = next(iter(answers.values()))
    ids = lambda result: [[entry["document"]["id"] for entry in q] for q in result]
    return {name: sum(a == b for a, b in zip(ids(result), ids(first))) for name, result in answers.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=20_000)
    parser.add_argument("--cache", default=str(ROOT / "runs" / "bench_cache"))
    parser.add_argument("--cell-seconds", type=float, default=8.0)
    parser.add_argument("--cell-requests", type=int, default=2000)
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("--unbatched", action="store_true", help="also run our server with --max-batch 1 (gRPC)")
    parser.add_argument("--http-target", action="append", default=[], metavar="NAME,URL[,PID]",
                        help="another server's Search-R1 endpoint to load the same way (PID: report its RSS)")
    args = parser.parse_args()

    import os

    import psutil

    from retrieval_service.process import RetrievalServer

    index = cached_index(pathlib.Path(args.cache), args.docs)
    if args.build_only:
        return 0
    print(f"load average {os.getloadavg()}", flush=True)
    kernel = compare_flat_kernels(index)
    print(f"servers search Flat with: {kernel} ({'--flat-search numpy, the default' if kernel == 'numpy' else '--flat-search faiss'})")
    pool = query_pool(whole_words(default_encoder_dir()))
    external = {}
    for spec in args.http_target:
        name, url, *pid = spec.split(",")
        external[name] = (url.rstrip("/"), int(pid[0]) if pid else None)

    ours = RetrievalServer(index, http_port=0, extra_args=["--flat-search", kernel]).start()
    servers = [ours]
    try:
        info = RetrievalClient(ours.address).health_info()
        print(f"ours: max_batch {info.max_batch}, kernel {info.search_kernel}, encoder {info.encoder}, "
              f"{info.num_documents:,} docs; {ours.log_tail(1)}", flush=True)
        targets = {"ours grpc": (ours.address, ours.pid), "ours http": (ours.http_url, ours.pid)}
        if args.unbatched:
            unbatched = RetrievalServer(index, max_batch=1, extra_args=["--flat-search", kernel]).start()
            servers.append(unbatched)
            targets["ours grpc unbatched"] = (unbatched.address, unbatched.pid)
        targets.update(external)
        http_targets = {name: t for name, t in targets.items() if t[0].startswith("http")}
        agree = same_top3(http_targets, pool)
        print("same top-3 ids as ours over HTTP, of 50 queries: "
              + ", ".join(f"{name} {n}/50" for name, n in agree.items()), flush=True)
        rows, qps_at_32 = [], {}
        for load, per_request, clients in CELLS:
            for name, (target, pid) in targets.items():
                requester = http_requester(target) if target.startswith("http") else target
                qps, p50, p99, errors = run_cell(requester, pool, per_request, clients, args.cell_seconds,
                                                 args.cell_requests)
                rss = psutil.Process(pid).memory_info().rss / 2**20 if pid else float("nan")
                rows.append((name, load, per_request, clients, qps, p50, p99, rss, errors))
                print(f"  {name:20s} ({load}) {per_request:2d} q/req  c={clients:2d}: {qps:8.1f} qps  p50 "
                      f"{p50:8.1f} ms  p99 {p99:8.1f} ms  rss {rss:6.0f} MiB  load {os.getloadavg()[0]:.1f}"
                      + (f"  errors {errors}" if errors else ""), flush=True)
                if per_request == 1 and clients == 32:
                    qps_at_32[name] = qps
    finally:
        for server in servers:
            server.stop()

    print()
    print("| server | load | queries/request | concurrency | QPS (queries/s) | p50 ms | p99 ms | server RSS MiB | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, load, per_request, clients, qps, p50, p99, rss, errors in rows:
        print(f"| {name} | ({load}) | {per_request} | {clients} | {qps:.1f} | {p50:.1f} | {p99:.1f} | {rss:.0f} | "
              f"{errors} |")
    if external:
        first = next(iter(external))
        print(f"ratio={qps_at_32['ours http'] / qps_at_32[first]:.2f}")
    elif args.unbatched:
        print(f"ratio={qps_at_32['ours grpc'] / qps_at_32['ours grpc unbatched']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
