"""faiss indexes over unit-norm embeddings (inner product = cosine): writing them in a stream, searching them.

Kinds and their memory per vector of D dims (bench/retrieval_scale.py measures them):
  flat     exact, 4·D bytes (e5-base: 3.07 GB per million passages; wiki-18's 21M: 64 GB)
  flat16   exact search over fp16 copies (faiss IndexScalarQuantizer QT_fp16), 2·D bytes, scores within ~1e-3
  hnsw     graph over fp32 vectors, 4·D + ~8·M bytes; approximate
  ivfpq    D/8 one-byte codes + 8-byte ids (~0.1 GB per million at 768 dims); approximate
The index on disk is always a real faiss index (Search-R1's e5_Flat.index imports as is). For flat and flat16 the
searcher may answer with a NumPy matmul + argpartition over the index's own storage (`flat_kernel="numpy"`), which
measured faster than faiss-cpu's bundled BLAS on small hosts (bench/retrieval_load.py prints both). `mmap=True`
maps the file instead of reading it (faiss IO_FLAG_MMAP_IFC): start-up is immediate and several replicas on one
host share one copy in the page cache.
"""

import dataclasses

import faiss
import numpy as np

INDEX_KINDS = ("flat", "flat16", "hnsw", "ivfpq")
FLAT_KERNELS = ("numpy", "faiss")
INDEX_FILE = "dense.faiss"
_FLAT_HEADER_BYTES = 45  # "IxFI", d, ntotal, 2 dummies, is_trained, metric, float count; then the vectors


@dataclasses.dataclass(frozen=True)
class DenseIndexParams:
    hnsw_m: int = 32                # graph degree
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 128       # search-time beam width
    ivf_nlist: int = 1024           # coarse clusters (cut to N // 39 when the corpus is too small to train them)
    ivf_nprobe: int = 32            # clusters visited per query
    pq_m: int | None = None         # sub-quantizers; None = dim // 8 (one byte per 8 dims)
    pq_bits: int = 8
    train_size: int = 200_000       # vectors buffered to train IVF-PQ before streaming the rest

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class DenseIndexWriter:
    """Streams float32[n, D] unit vectors into a faiss index of `kind`; `finish()` returns it (trained, filled).

    IVF-PQ needs training data up front: the first `train_size` vectors are buffered, used to train, then added.
    `notes` records any parameter the writer had to change (e.g. nlist for a tiny corpus) for the manifest.
    """

    def __init__(self, kind: str, dim: int, params: DenseIndexParams = DenseIndexParams()):
        if kind not in INDEX_KINDS:
            raise ValueError(f"index kind {kind!r} is not one of {INDEX_KINDS}")
        self.kind, self.dim, self.params = kind, dim, params
        self.notes: list[str] = []
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self._index = None
        if kind == "flat":
            self._index = faiss.IndexFlatIP(dim)
        elif kind == "flat16":
            self._index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        elif kind == "hnsw":
            self._index = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            self._index.hnsw.efConstruction = params.hnsw_ef_construction
        else:
            pq_m = params.pq_m or max(1, dim // 8)
            if dim % pq_m:
                raise ValueError(f"pq_m={pq_m} must divide the embedding dim {dim}")
            self._pq_m = pq_m

    def add(self, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"vectors of shape {vectors.shape} do not match the index dim {self.dim}")
        if self._index is not None:
            self._index.add(vectors)
            return
        self._buffer.append(vectors)
        self._buffered += len(vectors)
        if self._buffered >= self.params.train_size:
            self._train_ivfpq()

    def _train_ivfpq(self) -> None:
        train = np.concatenate(self._buffer) if self._buffer else np.zeros((0, self.dim), np.float32)
        self._buffer = []
        p = self.params
        nlist = p.ivf_nlist
        if len(train) < 39 * nlist:  # faiss' k-means wants >= 39 points per centroid
            nlist = max(1, len(train) // 39)
            self.notes.append(f"ivf_nlist cut from {p.ivf_nlist} to {nlist}: only {len(train)} training vectors")
        if len(train) < 2 ** p.pq_bits:
            raise ValueError(f"IVF-PQ with pq_bits={p.pq_bits} needs at least {2 ** p.pq_bits} vectors to train, "
                             f"the corpus has {len(train)}; use --index flat or hnsw, or lower --pq-bits")
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFPQ(quantizer, self.dim, nlist, self._pq_m, p.pq_bits, faiss.METRIC_INNER_PRODUCT)
        index.train(train)
        index.add(train)
        index.nprobe = min(p.ivf_nprobe, nlist)
        self._quantizer = quantizer  # the IVF index borrows it; keep it alive with the writer
        self._index = index

    def finish(self):
        if self._index is None:
            self._train_ivfpq()
        return self._index


def write_flat_index(path, parts, dim: int) -> int:
    """Writes a faiss IndexFlatIP file from float32[n_i, dim] parts without holding them all in memory.

    parts: a re-iterable of arrays (e.g. memory-mapped build shards); read twice, once to count. -> vectors written.
    faiss.read_index reads the file back like one written by faiss.write_index (a test checks byte equality).
    """
    total = sum(len(p) for p in parts)
    header = (b"IxFI" + np.int32(dim).tobytes() + np.int64(total).tobytes() + np.int64(1 << 20).tobytes() * 2
              + np.uint8(1).tobytes() + np.int32(faiss.METRIC_INNER_PRODUCT).tobytes()
              + np.int64(total * dim).tobytes())
    assert len(header) == _FLAT_HEADER_BYTES
    with open(path, "wb") as f:
        f.write(header)
        for part in parts:
            part = np.asarray(part)
            if part.dtype != np.float32 or part.ndim != 2 or part.shape[1] != dim:
                raise ValueError(f"vectors of {part.dtype} {part.shape} do not fit a {dim}-d float32 Flat index")
            f.write(np.ascontiguousarray(part).tobytes())
    return total


_KIND_OF_TYPE = {"IndexFlatIP": "flat", "IndexFlat": "flat", "IndexHNSWFlat": "hnsw", "IndexIVFPQ": "ivfpq"}


def index_kind(index) -> str:
    """The kind of a faiss index read from disk (for imports); ValueError for what the searcher cannot serve."""
    name = type(index).__name__
    if name == "IndexScalarQuantizer" and index.sq.qtype == faiss.ScalarQuantizer.QT_fp16:
        kind = "flat16"
    elif name in _KIND_OF_TYPE:
        kind = _KIND_OF_TYPE[name]
    else:
        raise ValueError(f"faiss index type {name} is not one of the kinds served here ({', '.join(INDEX_KINDS)}: "
                         f"IndexFlatIP, IndexScalarQuantizer fp16, IndexHNSWFlat, IndexIVFPQ)")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ValueError(f"faiss index metric is {index.metric_type} ({'L2' if index.metric_type == 1 else '?'}), "
                         f"not inner product (0); the service scores unit vectors by inner product")
    return kind


def _stored_rows(index, kind: str) -> np.ndarray:
    """A NumPy view [N, D] of a Flat (float32) or fp16 scalar-quantizer index's own storage; no copy.

    Valid while `index` lives. Memory-mapped storage may sit at an unaligned address (the faiss header is 45 bytes);
    the kernel copies such rows block by block into aligned memory.
    """
    n, d = index.ntotal, index.d
    if kind == "flat":
        return faiss.rev_swig_ptr(index.get_xb(), n * d).reshape(n, d)
    raw = faiss.rev_swig_ptr(index.codes.data(), n * index.code_size)
    return np.frombuffer(raw, dtype="<f2").reshape(n, d)


def top_k_inner_product(queries: np.ndarray, vectors: np.ndarray, k: int, block_rows: int = 1 << 15):
    """Exact top-k by inner product, in blocks of rows so a 21M-row database never makes a [B, N] score matrix.

    queries: float32[B, D], vectors: float32 or float16[N, D] (blocks that are fp16 or unaligned are converted to
    aligned float32 first: BLAS needs it) -> (scores float32[B, k'], rows int64[B, k']), best first, k' = min(k, N).
    """
    b, n = len(queries), len(vectors)
    k = min(k, n)
    best_scores = np.full((b, 0), -np.inf, np.float32)
    best_rows = np.zeros((b, 0), np.int64)
    for start in range(0, n, block_rows):
        block = vectors[start:start + block_rows]
        if block.dtype != np.float32 or not block.flags.aligned:
            block = block.astype(np.float32)
        scores = queries @ block.T  # float32[B, block]
        kk = min(k, scores.shape[1])
        if kk < scores.shape[1]:
            part = np.argpartition(scores, -kk, axis=1)[:, -kk:]  # the kk largest, in no order
        else:
            part = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
        best_scores = np.concatenate([best_scores, np.take_along_axis(scores, part, axis=1)], axis=1)
        best_rows = np.concatenate([best_rows, part + start], axis=1)
        if best_scores.shape[1] > k:
            keep = np.argpartition(best_scores, -k, axis=1)[:, -k:]
            best_scores = np.take_along_axis(best_scores, keep, axis=1)
            best_rows = np.take_along_axis(best_rows, keep, axis=1)
    order = np.lexsort((best_rows, -best_scores), axis=1)  # best first; ties by row, like a stable brute force
    return np.take_along_axis(best_scores, order, axis=1), np.take_along_axis(best_rows, order, axis=1)


class DenseSearcher:
    """Searches a faiss index file. search(float32[B, D], k) -> (scores float32[B, k], rows int64[B, k])."""

    def __init__(self, index_path, kind: str, *, flat_kernel: str = "numpy", mmap: bool = False,
                 ef_search: int | None = None, nprobe: int | None = None):
        if flat_kernel not in FLAT_KERNELS:
            raise ValueError(f"flat_kernel {flat_kernel!r} is not one of {FLAT_KERNELS}")
        self.kind, self.mmap = kind, mmap
        self.index = faiss.read_index(str(index_path), faiss.IO_FLAG_MMAP_IFC if mmap else 0)
        self.dim = self.index.d
        self._vectors = None
        if kind in ("flat", "flat16") and flat_kernel == "numpy":
            self._vectors = _stored_rows(self.index, kind)
            self.kernel = f"numpy-matmul-argpartition (over the faiss {kind} index's vectors)"
        else:
            self.kernel = f"faiss-{kind}"
        if mmap:
            self.kernel += ", memory-mapped"
        if kind == "hnsw" and ef_search:
            self.index.hnsw.efSearch = ef_search
        if kind == "ivfpq" and nprobe:
            faiss.extract_index_ivf(self.index).nprobe = nprobe

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int):
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self._vectors is not None:
            return top_k_inner_product(queries, self._vectors, k)
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(self.index.hnsw.efSearch, k)
        scores, rows = self.index.search(queries, min(k, self.index.ntotal))
        return scores, rows
