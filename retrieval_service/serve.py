"""The retrieval server process.

    python -m retrieval_service.serve --index indexes/wiki18-e5-flat --port 50051 [--http-port 8000]

Binds to 127.0.0.1 unless --host says otherwise. Logs QPS and latency every --log-every-s seconds of traffic to
stderr. SIGTERM / Ctrl-C stop it gracefully (in-flight requests get --grace-s seconds).
"""

import argparse
import json
import os
import pathlib
import signal
import sys
import threading
import time


def _log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    from retrieval_service.dense_index import FLAT_KERNELS
    from retrieval_service.encoder import RUNTIMES
    from retrieval_service.server import ServiceLimits

    limits = ServiceLimits()
    p = argparse.ArgumentParser(prog="python -m retrieval_service.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", required=True, help="index directory made by retrieval_service.build_index")
    p.add_argument("--port", type=int, required=True, help="gRPC port (0 = any free port)")
    p.add_argument("--http-port", type=int, default=None, help="also serve Search-R1's POST /retrieve here")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--max-batch", type=int, default=64, help="queries per micro-batch (1 = batching off)")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="longest wait for a batch to fill")
    p.add_argument("--max-queued", type=int, default=4096,
                   help="requests waiting at most; past it gRPC says RESOURCE_EXHAUSTED and HTTP 503")
    p.add_argument("--http-backlog", type=int, default=1024, help="listen backlog of the HTTP socket")
    p.add_argument("--max-top-k", type=int, default=limits.max_top_k)
    p.add_argument("--max-queries", type=int, default=limits.max_queries_per_request, help="per request")
    p.add_argument("--max-query-chars", type=int, default=limits.max_query_chars)
    p.add_argument("--max-message-mb", type=float, default=limits.max_message_bytes / 2**20)
    p.add_argument("--request-timeout-s", type=float, default=limits.request_timeout_s)
    p.add_argument("--default-top-k", type=int, default=3, help="HTTP requests without topk (Search-R1's 3)")
    p.add_argument("--flat-search", choices=FLAT_KERNELS, default="numpy",
                   help="kernel for Flat indexes: NumPy matmul + argpartition over the index's vectors, or faiss")
    p.add_argument("--mmap", action="store_true",
                   help="memory-map the faiss index instead of reading it: instant start-up, and replicas on one "
                        "host share one copy in the page cache")
    p.add_argument("--ef-search", type=int, default=None, help="HNSW search beam (default: the manifest's)")
    p.add_argument("--nprobe", type=int, default=None, help="IVF clusters visited (default: the manifest's)")
    p.add_argument("--encoder", default=None, help="encoder directory (dense: where the manifest's encoder lives "
                                                   "on this machine; bm25: enables Embed)")
    p.add_argument("--encoder-runtime", choices=RUNTIMES, default="onnx",
                   help="onnx: ONNX Runtime on the host CPU (default; a TPU VM's chips belong to the trainer); "
                        "jax: every local device; auto: jax when JAX sees an accelerator")
    p.add_argument("--workers", type=int, default=64, help="gRPC handler threads")
    p.add_argument("--log-every-s", type=float, default=10.0)
    p.add_argument("--grace-s", type=float, default=2.0)
    p.add_argument("--ready-file", default=None, help="write {grpc_port, http_port, pid} here once serving")
    p.add_argument("--no-warmup", action="store_true", help="skip compiling the encoder's query shapes")
    p.add_argument("--device", action="store_true",
                   help="run the encoder on the host's accelerators (default: the host CPU, so a service beside "
                        "a trainer never takes its TPU chips)")
    p.add_argument("--compile-cache", default=None,
                   help="persistent jit cache directory (default ~/.cache/retrieval_service/jax; '' = off)")
    args = p.parse_args(argv)
    limits = ServiceLimits(max_top_k=args.max_top_k, max_queries_per_request=args.max_queries,
                           max_query_chars=args.max_query_chars,
                           max_message_bytes=int(args.max_message_mb * 2**20),
                           request_timeout_s=args.request_timeout_s)
    for name in ("max_batch", "max_queued", "http_backlog"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args, limits


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--device" not in argv:
        os.environ["JAX_PLATFORMS"] = "cpu"  # before anything imports JAX (bm25s does, at import)
    args, limits = parse_args(argv)
    from retrieval_service.batcher import BatchStats, MicroBatcher
    from retrieval_service.http_api import SearchR1HttpServer
    from retrieval_service.searcher import Searcher
    from retrieval_service.server import RetrievalService, make_grpc_server

    started = time.monotonic()
    try:
        searcher = Searcher(args.index, flat_kernel=args.flat_search, mmap=args.mmap, encoder_dir=args.encoder,
                            encoder_runtime=args.encoder_runtime, ef_search=args.ef_search, nprobe=args.nprobe,
                            max_batch=args.max_batch, compile_cache_dir=args.compile_cache)
    except (FileNotFoundError, ValueError) as e:
        _log(f"[serve] error: {e}")
        return 2
    if not args.no_warmup:
        searcher.warmup()
    batcher = MicroBatcher(searcher, max_batch=args.max_batch, max_wait_s=args.max_wait_ms / 1e3,
                           max_queued=args.max_queued, stats=BatchStats(every_s=args.log_every_s, log=_log))
    service = RetrievalService(batcher, limits)
    try:
        grpc_server, grpc_port = make_grpc_server(service, host=args.host, port=args.port, max_workers=args.workers)
        http_server = None
        if args.http_port is not None:
            http_server = SearchR1HttpServer(batcher, limits, host=args.host, port=args.http_port,
                                             default_top_k=args.default_top_k, backlog=args.http_backlog)
    except OSError as e:
        _log(f"[serve] error: {e}")
        return 2
    grpc_server.start()
    if http_server:
        http_server.start()
    _log(f"[serve] ready in {time.monotonic() - started:.1f}s: grpc {args.host}:{grpc_port}"
         + (f", http {args.host}:{http_server.port} (POST /retrieve)" if http_server else "")
         + f"; {searcher.backend} {searcher.index_kind}, {len(searcher):,} documents, "
           f"kernel {searcher.kernel}, encoder {searcher.encoder_name or '-'}"
           + (f" ({searcher.encoder.runtime_description})" if searcher.encoder else "")
           + f", max_batch {args.max_batch}")
    stopping = threading.Event()  # handlers in place before anyone is told we are ready, so a prompt stop drains
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    if args.ready_file:
        ready = pathlib.Path(args.ready_file)
        tmp = ready.with_name(ready.name + ".tmp")
        tmp.write_text(json.dumps({"grpc_port": grpc_port, "http_port": http_server.port if http_server else None,
                                   "pid": os.getpid()}))
        tmp.replace(ready)  # atomic: the launcher never reads half a file

    # Polled, not a bare wait(): CPython runs signal handlers in the main thread only, and a SIGTERM the kernel
    # hands to one of gRPC's or XLA's threads would never wake a main thread blocked on the event's lock.
    while not stopping.wait(timeout=0.5):
        pass
    _log("[serve] stopping")
    if http_server:
        http_server.stop()
    grpc_server.stop(grace=args.grace_s).wait()
    batcher.close()
    _log("[serve] stopped")
    return 0


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    # Requests are drained and nothing is left to write; skip the seconds of interpreter teardown (grpc and XLA
    # thread pools) so restarts and test fixtures are quick.
    os._exit(code)
