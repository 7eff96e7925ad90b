"""Retrieval memory, start-up and speed as the index grows: synthetic e5-base-sized indexes, real servers.

    .venv/bin/python bench/retrieval_scale.py                       # 100k, 500k, 2M vectors x 768 dims
    .venv/bin/python bench/retrieval_scale.py --sizes 100000 --kinds flat,flat16   # a quick look

No encoding: each index holds random unit vectors float32[N, 768] (e5-base-v2's width), a document store of short
synthetic passages and a manifest naming a random 1-layer 768-d BERT made here (queries still go through a real
encoder, just a cheap one). Indexes are cached under runs/bench_cache/scale/ and written in a stream (Flat never sits
in the bench's memory). For every size and kind (flat, flat16, hnsw, ivfpq) a real server is started twice — index
read into memory, and memory-mapped (--mmap) — and the bench prints:
  start-up s       process start to serving (the same server on a 1,000-vector index is the baseline)
  RSS / PSS MiB    of the server after the load cell (PSS splits shared pages between the processes mapping them)
  QPS, p99 ms      one-query gRPC requests from 32 concurrent clients, bounded by --cell-seconds
Then, for the largest mmap'd Flat index, two replicas on one host: their PSS add up to about one copy (the page
cache holds the vectors once), where two loaded replicas hold two. Last, a least-squares fit RSS = a + b·N per kind
(mmap'd flat counts its mapped pages) and its extrapolation to wiki-18's 21M passages. Random vectors are the worst
case for HNSW and IVF-PQ recall (no clusters); their memory and speed are what this measures. HNSW is built with
efConstruction 40 to keep the bench within minutes (it does not change the memory).
"""

import argparse
import json
import pathlib
import shutil
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from retrieval_load import run_cell  # noqa: E402  (bench/ is the script's directory)

from retrieval_service import dense_index  # noqa: E402
from retrieval_service.build_index import MANIFEST_FILE, MANIFEST_VERSION  # noqa: E402
from retrieval_service.corpus import CorpusDocument  # noqa: E402
from retrieval_service.docstore import DocumentStoreWriter  # noqa: E402

WIKI18_PASSAGES = 21_015_324
KINDS = ("flat", "flat16", "hnsw", "ivfpq")
CHUNK = 1 << 16


class SyntheticVectors:
    """Re-iterable chunks of random unit vectors float32[<=CHUNK, dim]; the same every time (seeded)."""

    def __init__(self, n: int, dim: int, seed: int = 0):
        self.n, self.dim, self.seed = n, dim, seed

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        for start in range(0, self.n, CHUNK):
            x = rng.standard_normal((min(CHUNK, self.n - start), self.dim), dtype=np.float32)
            yield x / np.linalg.norm(x, axis=1, keepdims=True)


def make_encoder(out: pathlib.Path, dim: int) -> pathlib.Path:
    """A random 1-layer BERT of width `dim` with MiniLM's tokenizer, written with NumPy (no torch)."""
    from safetensors.numpy import save_file

    from retrieval_service.bert_weights import BertConfig, tensor_shapes
    from retrieval_service.encoder import default_encoder_dir

    if (out / "model.safetensors").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    hf = {"model_type": "bert", "vocab_size": 30522, "hidden_size": dim, "num_hidden_layers": 1,
          "num_attention_heads": 12, "intermediate_size": dim, "max_position_embeddings": 512}
    (out / "config.json").write_text(json.dumps(hf))
    cfg = BertConfig.from_hf(out)
    rng = np.random.default_rng(0)
    save_file({name: (rng.standard_normal(shape, dtype=np.float32) * 0.02 if len(shape) == 2 else
                      np.ones(shape, np.float32) if "LayerNorm.weight" in name else np.zeros(shape, np.float32))
               for name, shape in tensor_shapes(cfg).items()}, str(out / "model.safetensors"))
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(default_encoder_dir() / name, out / name)
    return out


def write_index_dir(out: pathlib.Path, n: int, kind: str, encoder_info: dict, dim: int) -> pathlib.Path:
    """An index directory the server loads: synthetic vectors of `kind`, a document store, a manifest."""
    import faiss

    if (out / MANIFEST_FILE).exists():
        return out
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    started = time.monotonic()
    vectors = SyntheticVectors(n, dim)
    params = dense_index.DenseIndexParams(hnsw_m=32, hnsw_ef_construction=40, hnsw_ef_search=64,
                                          ivf_nlist=1024, ivf_nprobe=32, train_size=100_000)
    if kind == "flat":
        dense_index.write_flat_index(partial / dense_index.INDEX_FILE, vectors, dim)
    else:
        writer = dense_index.DenseIndexWriter(kind, dim, params)
        for chunk in vectors:
            writer.add(chunk)
        faiss.write_index(writer.finish(), str(partial / dense_index.INDEX_FILE))
        del writer
    store = DocumentStoreWriter(partial)
    for i in range(n):
        store.add(CorpusDocument(str(i), f"Passage {i}", f"Synthetic passage number {i} of the scale benchmark."))
    store.close()
    manifest = {"format_version": MANIFEST_VERSION, "backend": "dense", "index_kind": kind,
                "index_params": params.to_dict(), "index_notes": [], "encoder": encoder_info,
                "vectors": {"source": "synthetic", "note": "random unit vectors"}, "num_documents": n,
                "corpus": {"path": "(synthetic)", "sha256": "", "bytes": 0, "bad_lines_skipped": 0,
                           "first_bad_line": None}}
    (partial / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    print(f"  wrote {out.name}: {(out / dense_index.INDEX_FILE).stat().st_size / 2**30:.2f} GiB in "
          f"{time.monotonic() - started:.0f} s", flush=True)
    return out


def memory_mib(pid: int) -> tuple[float, float]:
    import psutil

    info = psutil.Process(pid).memory_full_info()
    return info.rss / 2**20, info.pss / 2**20


def serve_and_measure(index: pathlib.Path, mmap: bool, args, pool) -> dict:
    from retrieval_service.client import RetrievalClient
    from retrieval_service.process import RetrievalServer

    server = RetrievalServer(index, extra_args=["--mmap"] if mmap else [])
    started = time.monotonic()
    with server:
        startup = time.monotonic() - started
        RetrievalClient(server.address, deadline_s=120).retrieve(pool[:8], 3)  # touch the index once
        qps = p50 = p99 = float("nan")
        errors = 0
        if args.cell_seconds > 0:
            qps, p50, p99, errors = run_cell(server.address, pool, 1, 32, args.cell_seconds, args.cell_requests)
        rss, pss = memory_mib(server.pid)
    return {"startup_s": startup, "rss": rss, "pss": pss, "qps": qps, "p50": p50, "p99": p99, "errors": errors}


def replicas_share(index: pathlib.Path, mmap: bool, pool) -> tuple[float, float]:
    """Two replicas of one index on this host: -> (sum of their PSS, sum of their RSS) in MiB."""
    from retrieval_service.client import RetrievalClient
    from retrieval_service.process import RetrievalServer

    servers = [RetrievalServer(index, extra_args=["--mmap"] if mmap else []) for _ in range(2)]
    try:
        for server in servers:
            server.start()
            RetrievalClient(server.address, deadline_s=120).retrieve(pool[:8], 3)
        memory = [memory_mib(server.pid) for server in servers]
    finally:
        for server in servers:
            server.stop()
    return sum(p for _, p in memory), sum(r for r, _ in memory)


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares MiB = a + b * millions. -> (a MiB, b MiB per million vectors)."""
    x = np.asarray([n / 1e6 for n, _ in points])
    y = np.asarray([m for _, m in points])
    b, a = np.polyfit(x, y, 1) if len(points) > 1 else (y[0] / x[0], 0.0)
    return float(a), float(b)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,500000,2000000")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--hnsw-max", type=int, default=500_000, help="largest HNSW index built (it builds slowly)")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--cache", default=str(ROOT / "runs" / "bench_cache" / "scale"))
    parser.add_argument("--cell-seconds", type=float, default=8.0, help="0: memory and start-up only, no load")
    parser.add_argument("--cell-requests", type=int, default=1500)
    parser.add_argument("--keep", action="store_true", help="keep the index files (default: delete each after use)")
    parser.add_argument("--build-only", action="store_true",
                        help="write the cached indexes and stop (building is not what is timed: run it unlocked)")
    args = parser.parse_args()
    import os

    from retrieval_service.encoder import TextEncoder

    sizes = [int(s) for s in args.sizes.split(",")]
    kinds = args.kinds.split(",")
    cache = pathlib.Path(args.cache)
    encoder_dir = make_encoder(cache / f"bert-1layer-{args.dim}", args.dim)
    encoder_info = TextEncoder(encoder_dir, max_length=64).describe()
    rng = np.random.default_rng(1)
    words = (encoder_dir / "vocab.txt").read_text().split("\n")[2000:12000]
    pool = [" ".join(rng.choice(words, size=int(rng.integers(3, 9)))) for _ in range(2000)]
    print(f"load average {os.getloadavg()}", flush=True)

    baseline_dir = write_index_dir(cache / f"flat-1000-{args.dim}", 1000, "flat", encoder_info, args.dim)
    if args.build_only:
        for n in sizes:
            for kind in kinds:
                if not (kind == "hnsw" and n > args.hnsw_max):
                    write_index_dir(cache / f"{kind}-{n}-{args.dim}", n, kind, encoder_info, args.dim)
        return 0
    base = serve_and_measure(baseline_dir, False, args, pool)
    print(f"baseline server (1,000 x {args.dim} flat): start-up {base['startup_s']:.1f} s, RSS {base['rss']:.0f} MiB, "
          f"PSS {base['pss']:.0f} MiB", flush=True)

    rows = []
    for n in sizes:
        for kind in kinds:
            if kind == "hnsw" and n > args.hnsw_max:
                print(f"  skipping hnsw at {n:,} (--hnsw-max {args.hnsw_max:,})", flush=True)
                continue
            index = write_index_dir(cache / f"{kind}-{n}-{args.dim}", n, kind, encoder_info, args.dim)
            for mmap in (False, True):
                m = serve_and_measure(index, mmap, args, pool)
                rows.append({"n": n, "kind": kind, "mmap": mmap, **m})
                print(f"  {kind:6s} {n:>9,} {'mmap  ' if mmap else 'loaded'}: start-up {m['startup_s']:5.1f} s  "
                      f"RSS {m['rss']:7.0f} MiB  PSS {m['pss']:7.0f} MiB  {m['qps']:7.1f} qps  p50 {m['p50']:7.1f} ms"
                      f"  p99 {m['p99']:7.1f} ms" + (f"  errors {m['errors']}" if m["errors"] else "")
                      + f"  load {os.getloadavg()[0]:.1f}", flush=True)
            if kind == "flat" and n == max(sizes):
                for mmap in (True, False):
                    pss, rss = replicas_share(index, mmap, pool)
                    print(f"  two {'mmap' if mmap else 'loaded'} replicas of flat {n:,}: PSS sum {pss:.0f} MiB, "
                          f"RSS sum {rss:.0f} MiB (one server's RSS ~{rows[-2 + mmap]['rss']:.0f} MiB)", flush=True)
            if not args.keep:
                shutil.rmtree(index)

    print()
    print(f"| kind | vectors | mode | start-up s | RSS MiB | PSS MiB | QPS (c=32) | p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['n']:,} | {'mmap' if r['mmap'] else 'loaded'} | {r['startup_s']:.1f} | "
              f"{r['rss']:.0f} | {r['pss']:.0f} | {r['qps']:.1f} | {r['p99']:.0f} |")
    print()
    print(f"RSS above the baseline server ({base['rss']:.0f} MiB), fitted as a + b*N, extrapolated to wiki-18's "
          f"{WIKI18_PASSAGES / 1e6:.1f}M passages:")
    print("| kind | mode | a MiB | b MiB per million | 21M: GiB | start-up at largest N s |")
    print("|---|---|---|---|---|---|")
    slopes = {}
    for kind in kinds:
        for mmap in (False, True):
            points = [(r["n"], r["rss"] - base["rss"]) for r in rows if r["kind"] == kind and r["mmap"] == mmap]
            if not points:
                continue
            a, b = fit(points)
            slopes[(kind, mmap)] = b
            largest = max((r for r in rows if r["kind"] == kind and r["mmap"] == mmap), key=lambda r: r["n"])
            print(f"| {kind} | {'mmap' if mmap else 'loaded'} | {a:.0f} | {b:.0f} | "
                  f"{(a + b * WIKI18_PASSAGES / 1e6 + base['rss']) / 1024:.1f} | {largest['startup_s']:.1f} |")
    if ("flat", False) in slopes:
        print(f"slope_flat_mib_per_million={slopes[('flat', False)]:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
