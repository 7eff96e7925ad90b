"""Searcher: an index directory loaded for serving — encoder (dense), index, document store — behind two calls.

    searcher = Searcher("indexes/wiki18-e5-flat")
    hits = searcher.retrieve(["who wrote hamlet"], top_k=3)   # [[(CorpusDocument, score), ...]]
    vectors = searcher.embed(["who wrote hamlet"])           # float32[1, D], unit rows

The encoder is rebuilt from the manifest (path, max length, prefixes) and its weights must hash to what the index
was built with, so queries are embedded exactly as the passages were.
"""

import pathlib

import numpy as np

from retrieval_service import dense_index
from retrieval_service.build_index import read_manifest
from retrieval_service.docstore import DocumentStore


class Searcher:
    def __init__(self, index_dir, *, flat_kernel: str = "numpy", mmap: bool = False, encoder_dir=None,
                 encoder_runtime: str = "onnx", ef_search: int | None = None, nprobe: int | None = None,
                 max_batch: int = 64, compile_cache_dir=None):
        """encoder_dir: where the manifest's encoder lives on this machine (default: the recorded path); for a
        BM25 index, an optional encoder that enables embed(). encoder_runtime: "onnx" (CPU, the default: on a TPU
        VM the chips belong to the trainer), "jax" (every local device) or "auto". mmap: map the faiss index
        instead of reading it (instant start-up; replicas share the page cache). compile_cache_dir: persistent jit
        cache for the jax runtime (None = ~/.cache/retrieval_service/jax, "" = off)."""
        self._compile_cache_dir = compile_cache_dir
        self._encoder_runtime = encoder_runtime
        self.index_dir = pathlib.Path(index_dir)
        self.manifest = read_manifest(self.index_dir)
        self.backend = self.manifest["backend"]
        self.index_kind = self.manifest["index_kind"]
        self.store = DocumentStore(self.index_dir)
        self.encoder = None
        if self.backend == "dense":
            self.encoder = self._load_recorded_encoder(encoder_dir, max_batch)
            self.index = dense_index.DenseSearcher(self.index_dir / dense_index.INDEX_FILE, self.index_kind,
                                                   flat_kernel=flat_kernel, mmap=mmap, ef_search=ef_search,
                                                   nprobe=nprobe)
        else:
            from retrieval_service.bm25_index import BM25Searcher  # bm25s imports JAX when installed: BM25 only

            self.index = BM25Searcher(self.index_dir)
            if encoder_dir is not None:
                from retrieval_service.encoder import TextEncoder

                self._enable_compile_cache()
                self.encoder = TextEncoder(encoder_dir, max_batch=max_batch, runtime=encoder_runtime)
        if len(self.index) != len(self.store):
            raise ValueError(f"{self.index_dir}: the index has {len(self.index)} vectors/documents but the "
                             f"document store has {len(self.store)}; rebuild the index")
        self.kernel = self.index.kernel

    def _load_recorded_encoder(self, encoder_dir, max_batch):
        from retrieval_service.encoder import TextEncoder

        self._enable_compile_cache()
        recorded = self.manifest["encoder"]
        path = pathlib.Path(encoder_dir or recorded["path"])
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{self.index_dir}/manifest.json: encoder {recorded['path']} is not on this "
                                    f"machine; pass --encoder DIR pointing at a copy of {recorded['name']}")
        encoder = TextEncoder(path, max_length=recorded["max_length"], query_prefix=recorded["query_prefix"],
                              passage_prefix=recorded["passage_prefix"], max_batch=max_batch,
                              runtime=self._encoder_runtime)
        actual = encoder.describe()
        if actual["weights_sha256"] != recorded["weights_sha256"]:
            raise ValueError(f"encoder {path} has weights sha256 {actual['weights_sha256'][:12]}…, but "
                             f"{self.index_dir} was built with {recorded['weights_sha256'][:12]}…")
        if actual["dim"] != recorded["dim"]:
            raise ValueError(f"encoder {path} makes {actual['dim']}-d vectors, the index holds {recorded['dim']}-d")
        return encoder

    def _enable_compile_cache(self):
        if self._encoder_runtime == "onnx":
            return  # nothing to compile, and no JAX import
        from retrieval_service.bert_jax import default_compile_cache_dir, enable_compile_cache

        cache = self._compile_cache_dir
        enable_compile_cache(default_compile_cache_dir() if cache is None else cache)

    @property
    def encoder_name(self) -> str:
        return self.encoder.name if self.encoder is not None else ""

    def __len__(self) -> int:
        return len(self.store)

    def search(self, queries: list[str], top_k: int):
        """-> (scores float32[B, k'], rows int64[B, k']), best first, k' = min(top_k, N)."""
        if self.backend == "dense":
            return self.index.search(self.encoder.embed_queries(queries), top_k)
        return self.index.search(queries, top_k)

    def retrieve(self, queries: list[str], top_k: int) -> list[list[tuple]]:
        """-> per query, [(CorpusDocument, score)] best first."""
        scores, rows = self.search(queries, top_k)
        # Approximate indexes pad with row -1 when they find fewer than k candidates.
        return [[(self.store[int(r)], float(s)) for s, r in zip(srow, rrow) if r >= 0]
                for srow, rrow in zip(scores, rows)]

    def embed(self, texts: list[str], *, as_passages: bool = False) -> np.ndarray:
        if self.encoder is None:
            raise RuntimeError(f"{self.index_dir} is a BM25 index and the server has no encoder; "
                               f"start it with --encoder DIR to serve Embed")
        return self.encoder.embed_passages(texts) if as_passages else self.encoder.embed_queries(texts)

    def warmup(self) -> None:
        """Compiles the encoder's common query shapes so the first requests do not pay for jit."""
        if self.encoder is not None:
            self.encoder.warmup()
        if len(self.store):
            self.retrieve(["warmup"], 1)
