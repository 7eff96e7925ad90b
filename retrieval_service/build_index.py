"""Index builder: a corpus JSONL -> an index directory the server loads; or an existing faiss index imported as is.

    python -m retrieval_service.build_index --corpus wiki-18.jsonl --backend dense --index flat \
        --encoder /path/to/e5-base-v2 --out indexes/wiki18-e5-flat
    python -m retrieval_service.build_index --import-faiss e5_Flat.index --corpus wiki-18.jsonl \
        --encoder /path/to/e5-base-v2 --out indexes/wiki18-e5-flat      # Search-R1's published index, no encoding

The corpus is streamed in chunks (bounded memory whatever its size); progress with rate and ETA goes to stderr.
Dense builds encode on every local device (JAX) or with ONNX Runtime on CPU, and keep their progress in shards
(build_shards.py): killed and run again with the same arguments, a build continues from its last finished shard.
The output directory holds:
  manifest.json                 backend, index kind and parameters, encoder (name, dim, pooling, prefixes, weights
                                hash), where the vectors came from, document count, corpus path + sha256 + skipped
                                bad lines
  docs.jsonl, docs.offsets.int64  the document store (docstore.py), row i = index id i
  dense.faiss | bm25/           the index
It is written to OUT.partial and renamed at the end, so an unfinished build never looks complete.
"""

import argparse
import datetime
import json
import os
import pathlib
import shutil
import sys
import time

if __name__ == "__main__" and "--device" not in sys.argv[1:]:
    os.environ["JAX_PLATFORMS"] = "cpu"  # before bm25s (at import) and the encoder load JAX; --device opts out

from retrieval_service import dense_index
from retrieval_service.build_shards import ResumeMismatch, ShardedBuild
from retrieval_service.corpus import CorpusError, CorpusReader
from retrieval_service.docstore import DocumentStoreWriter
from retrieval_service.encoder import file_sha256

BACKENDS = ("dense", "bm25")
MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1


class ProgressLine:
    """A progress line on stderr at most every `every_s` seconds: documents, rate, % of bytes and ETA."""

    def __init__(self, reader: CorpusReader, *, stream=sys.stderr, every_s: float = 10.0, label="build_index"):
        self.reader, self.stream, self.every_s, self.label = reader, stream, every_s, label
        self.start = self._last = time.monotonic()
        self._start_docs, self._start_bytes = reader.documents, reader.bytes_read  # a resumed build's head start

    def update(self, force: bool = False, note: str = "") -> None:
        now = time.monotonic()
        if not force and now - self._last < self.every_s:
            return
        self._last = now
        elapsed = max(now - self.start, 1e-9)
        total = max(self.reader.total_bytes, 1)
        done = self.reader.bytes_read / total
        rate_bytes = (self.reader.bytes_read - self._start_bytes) / elapsed
        eta = (total - self.reader.bytes_read) / rate_bytes if rate_bytes > 0 else float("nan")
        eta_text = str(datetime.timedelta(seconds=round(eta))) if eta == eta else "?"
        print(f"[{self.label}] {self.reader.documents:,} docs  "
              f"{(self.reader.documents - self._start_docs) / elapsed:,.0f} docs/s  "
              f"{100 * done:5.1f}% of {self.reader.total_bytes / 1e6:,.1f} MB  elapsed "
              f"{datetime.timedelta(seconds=round(elapsed))}  ETA {eta_text}"
              + (f"  bad lines skipped {self.reader.bad_lines}" if self.reader.bad_lines else "") + note,
              file=self.stream, flush=True)


def _make_encoder(encoder, runtime: str, batch_size: int | None):
    from retrieval_service.encoder import TextEncoder

    if isinstance(encoder, TextEncoder):
        return encoder
    return TextEncoder(encoder, max_batch=batch_size or 64, runtime=runtime)


def _corpus_record(corpus, sha256: str, reader: CorpusReader) -> dict:
    return {"path": str(pathlib.Path(corpus).resolve()), "sha256": sha256, "bytes": reader.total_bytes,
            "bad_lines_skipped": reader.bad_lines, "first_bad_line": reader.first_bad_line}


def _finish(partial: pathlib.Path, out: pathlib.Path, manifest: dict, started: float) -> dict:
    manifest["built_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    manifest["build_seconds"] = round(time.monotonic() - started, 1)
    (partial / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return manifest


def _check_out(out: pathlib.Path, overwrite: bool) -> pathlib.Path:
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    return out.with_name(out.name + ".partial")


def build_index(corpus, out, *, backend: str = "dense", encoder=None, index_kind: str = "flat",
                params: dense_index.DenseIndexParams = dense_index.DenseIndexParams(), skip_bad_lines=False,
                chunk_docs: int = 2048, shard_docs: int = 102_400, restart: bool = False, overwrite: bool = False,
                encoder_runtime: str = "auto", batch_size: int | None = None,
                progress_every_s: float = 10.0) -> dict:
    """Builds an index directory at `out` and returns its manifest.

    encoder: a TextEncoder, an HF BERT directory, or None (the default all-MiniLM-L6-v2); dense backend only.
    A dense build resumes from OUT.partial when one with the same corpus and arguments is there (restart=True
    discards it); it raises ResumeMismatch naming the differences otherwise.
    Raises CorpusError (file:line: reason) on a malformed line unless skip_bad_lines.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
    if shard_docs % chunk_docs:
        raise ValueError(f"shard_docs={shard_docs} must be a multiple of chunk_docs={chunk_docs}")
    out = pathlib.Path(out)
    partial = _check_out(out, overwrite)
    started = time.monotonic()
    print(f"[build_index] hashing {corpus}", file=sys.stderr, flush=True)
    corpus_sha256 = file_sha256(corpus)
    if backend == "bm25":
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        try:
            return _build_bm25(partial, out, corpus, corpus_sha256, skip_bad_lines, progress_every_s, started)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)  # BM25 builds are quick: start them over
            raise
    encoder = _make_encoder(encoder, encoder_runtime, batch_size)
    encoder_info = encoder.describe()
    fingerprint = {
        "corpus": {"sha256": corpus_sha256, "bytes": pathlib.Path(corpus).stat().st_size},
        "index_kind": index_kind, "index_params": params.to_dict(), "skip_bad_lines": skip_bad_lines,
        "chunk_docs": chunk_docs, "shard_docs": shard_docs,
        "encoder": {key: value for key, value in encoder_info.items() if key != "path"},
        "encoder_runtime": encoder.runtime, "batch_size": encoder.max_batch,
    }
    build = ShardedBuild(partial, fingerprint, encoder.dim, restart=restart)
    try:
        return _build_dense(build, out, corpus, corpus_sha256, encoder, encoder_info, index_kind, params,
                            skip_bad_lines, chunk_docs, shard_docs, progress_every_s, started)
    except CorpusError:
        shutil.rmtree(partial, ignore_errors=True)  # the corpus must change, so its shards could not be reused
        raise
    except BaseException:
        print(f"[build_index] stopped; {len(build.shards)} finished shards kept in {partial}: run the same command "
              f"again to resume", file=sys.stderr, flush=True)
        raise


def _build_dense(build: ShardedBuild, out, corpus, corpus_sha256, encoder, encoder_info, index_kind, params,
                 skip_bad_lines, chunk_docs, shard_docs, progress_every_s, started) -> dict:
    reader = CorpusReader(corpus, skip_bad_lines=skip_bad_lines, start=build.read_position())
    store = DocumentStoreWriter(build.dir, resume_at=build.store_position())
    if build.resumed:
        print(f"[build_index] resuming {build.dir}: {len(build.shards)} shards, {reader.documents:,} documents "
              f"already encoded", file=sys.stderr, flush=True)
    print(f"[build_index] encoding with {encoder.runtime_description}, batches of {encoder.max_batch}",
          file=sys.stderr, flush=True)
    progress = ProgressLine(reader, every_s=progress_every_s)
    in_shard, chunk = 0, []

    def encode_chunk():
        nonlocal in_shard, chunk
        if chunk:
            build.append(encoder.embed_passages([doc.contents for doc in chunk]))
            in_shard += len(chunk)
            chunk = []
        progress.update(note=f"  shards done {len(build.shards)}")

    def seal_shard():
        nonlocal in_shard
        encode_chunk()
        if in_shard:
            build.finish_shard(in_shard, reader.position(), store.flush())
            in_shard = 0

    for doc in reader:
        store.add(doc)
        chunk.append(doc)
        if len(chunk) == chunk_docs:
            encode_chunk()
            if in_shard == shard_docs:
                seal_shard()
    seal_shard()
    progress.update(force=True, note=f"  shards done {len(build.shards)}")
    num_documents = store.close()
    if num_documents == 0:
        raise ValueError(f"corpus {corpus} has no documents" +
                         (f" ({reader.bad_lines} bad lines skipped)" if reader.bad_lines else ""))

    index_path = build.dir / dense_index.INDEX_FILE
    parts = build.vectors()
    notes = []
    print(f"[build_index] writing the {index_kind} index of {num_documents:,} vectors", file=sys.stderr, flush=True)
    if index_kind == "flat":  # streamed from the shards: a 64 GB index never sits in memory
        dense_index.write_flat_index(index_path, parts, encoder.dim)
    else:
        import faiss

        writer = dense_index.DenseIndexWriter(index_kind, encoder.dim, params)
        for part in parts:
            for start in range(0, len(part), 1 << 16):
                writer.add(part[start:start + (1 << 16)])
        faiss.write_index(writer.finish(), str(index_path))
        notes = writer.notes
    del parts
    build.discard_shards()
    manifest = {
        "format_version": MANIFEST_VERSION, "backend": "dense", "index_kind": index_kind,
        "index_params": params.to_dict(), "index_notes": notes, "encoder": encoder_info,
        "vectors": {"source": "encoded", "runtime": encoder.runtime_description},
        "num_documents": num_documents, "corpus": _corpus_record(corpus, corpus_sha256, reader),
    }
    return _finish(build.dir, out, manifest, started)


def _build_bm25(partial, out, corpus, corpus_sha256, skip_bad_lines, progress_every_s, started) -> dict:
    from retrieval_service import bm25_index  # bm25s imports JAX when it is installed: only for BM25 builds

    reader = CorpusReader(corpus, skip_bad_lines=skip_bad_lines)
    progress = ProgressLine(reader, every_s=progress_every_s)
    store = DocumentStoreWriter(partial)
    writer = bm25_index.BM25IndexWriter()
    chunk = []
    for doc in reader:
        store.add(doc)
        chunk.append(doc.contents)
        if len(chunk) == 2048:
            writer.add(chunk)
            chunk = []
            progress.update()
    writer.add(chunk)
    progress.update(force=True)
    num_documents = store.close()
    if num_documents == 0:
        raise ValueError(f"corpus {corpus} has no documents" +
                         (f" ({reader.bad_lines} bad lines skipped)" if reader.bad_lines else ""))
    print(f"[build_index] scoring BM25 over {num_documents:,} documents", file=sys.stderr, flush=True)
    writer.finish(partial)
    manifest = {
        "format_version": MANIFEST_VERSION, "backend": "bm25", "index_kind": "bm25",
        "index_params": {"library": "bm25s", "stopwords": bm25_index.STOPWORDS}, "index_notes": [],
        "encoder": None, "num_documents": num_documents,
        "corpus": _corpus_record(corpus, corpus_sha256, reader),
    }
    return _finish(partial, out, manifest, started)


def _place_file(source: pathlib.Path, target: pathlib.Path) -> str:
    """Hard-links `source` to `target` (same file system: no copy of a 64 GB index), else copies it."""
    try:
        os.link(source, target)
        return "hard link"
    except OSError:
        print(f"[build_index] copying {source} ({source.stat().st_size / 1e9:.1f} GB)", file=sys.stderr, flush=True)
        shutil.copyfile(source, target)
        return "copy"


def import_faiss_index(index_file, corpus, out, *, encoder=None, skip_bad_lines=False, overwrite=False,
                       encoder_runtime: str = "auto", sample: int = 16, progress_every_s: float = 10.0) -> dict:
    """Serves an existing faiss index (e.g. Search-R1's e5_Flat.index) with `corpus` as its documents, unencoded.

    Checks that the index's vector count equals the corpus's document count, that its dimension equals the encoder's
    and its metric is inner product, and — where the index can give its vectors back (flat, flat16, hnsw) — that the
    first `sample` passages encoded here agree with the stored vectors (cosine >= 0.99: same encoder, prefixes and
    corpus order). Errors name both numbers. The manifest records where the vectors came from.
    """
    import faiss
    import numpy as np

    index_file = pathlib.Path(index_file)
    if not index_file.is_file():
        raise FileNotFoundError(f"faiss index {index_file} does not exist")
    out = pathlib.Path(out)
    partial = _check_out(out, overwrite)
    started = time.monotonic()
    index = faiss.read_index(str(index_file), faiss.IO_FLAG_MMAP_IFC)  # header and a view; nothing is loaded
    kind = dense_index.index_kind(index)
    encoder = _make_encoder(encoder, encoder_runtime, None)
    if index.d != encoder.dim:
        raise ValueError(f"{index_file} holds {index.d}-d vectors but the encoder {encoder.model_dir} makes "
                         f"{encoder.dim}-d ones")
    print(f"[build_index] importing {index_file}: faiss {type(index).__name__} ({kind}), {index.ntotal:,} x "
          f"{index.d}; hashing {corpus}", file=sys.stderr, flush=True)
    corpus_sha256 = file_sha256(corpus)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        reader = CorpusReader(corpus, skip_bad_lines=skip_bad_lines)
        progress = ProgressLine(reader, every_s=progress_every_s, label="build_index import")
        store = DocumentStoreWriter(partial)
        head = []
        for doc in reader:
            store.add(doc)
            if len(head) < sample:
                head.append(doc.contents)
            progress.update()
        progress.update(force=True)
        num_documents = store.close()
        if num_documents != index.ntotal:
            raise ValueError(f"{index_file} holds {index.ntotal:,} vectors but {corpus} has {num_documents:,} "
                             f"documents" + (f" ({reader.bad_lines} bad lines skipped)" if reader.bad_lines else "")
                             + "; the index must have been built from exactly this corpus, in this order")
        check = {"passages": 0}
        if kind in ("flat", "flat16", "hnsw") and head:
            stored = index.reconstruct_n(0, len(head))
            cosine = np.sum(stored * encoder.embed_passages(head), axis=1) / np.maximum(
                np.linalg.norm(stored, axis=1), 1e-12)
            check = {"passages": len(head), "min_cosine": round(float(cosine.min()), 6)}
            if cosine.min() < 0.99:
                worst = int(cosine.argmin())
                raise ValueError(
                    f"passage {worst} of {corpus} encoded by {encoder.model_dir} (prefix "
                    f"{encoder.passage_prefix!r}) has cosine {cosine[worst]:.4f} with vector {worst} of {index_file}: "
                    f"the index was not built with this encoder, these prefixes and this corpus")
        placed = _place_file(index_file, partial / dense_index.INDEX_FILE)
        manifest = {
            "format_version": MANIFEST_VERSION, "backend": "dense", "index_kind": kind,
            "index_params": dense_index.DenseIndexParams().to_dict(), "index_notes": [],
            "encoder": encoder.describe(),
            "vectors": {"source": "imported", "from": str(index_file.resolve()), "bytes": index_file.stat().st_size,
                        "faiss_type": type(index).__name__, "placed_by": placed, "sample_check": check},
            "num_documents": num_documents, "corpus": _corpus_record(corpus, corpus_sha256, reader),
        }
        del index
        return _finish(partial, out, manifest, started)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def read_manifest(index_dir) -> dict:
    path = pathlib.Path(index_dir) / MANIFEST_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: {index_dir} is not an index built by "
                                f"`python -m retrieval_service.build_index` (or the build did not finish)")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != MANIFEST_VERSION:
        raise ValueError(f"{path}: format_version {manifest.get('format_version')!r}, this code reads "
                         f"{MANIFEST_VERSION}; rebuild the index")
    return manifest


def main(argv=None) -> int:
    from retrieval_service.encoder import RUNTIMES

    parser = argparse.ArgumentParser(prog="python -m retrieval_service.build_index", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True, help="JSONL (or .jsonl.gz) corpus, Search-R1 format")
    parser.add_argument("--backend", choices=BACKENDS, default=None, help="required unless --import-faiss")
    parser.add_argument("--out", required=True, help="index directory to create")
    parser.add_argument("--import-faiss", default=None, metavar="INDEX",
                        help="serve this existing faiss index (e.g. Search-R1's e5_Flat.index) instead of encoding")
    parser.add_argument("--encoder", default=None,
                        help="HF BERT directory (config.json + model.safetensors); default all-MiniLM-L6-v2")
    parser.add_argument("--encoder-runtime", choices=RUNTIMES, default="auto",
                        help="jax: every local device (TPU/GPU); onnx: ONNX Runtime on CPU; auto: jax when JAX "
                             "sees an accelerator, else onnx")
    parser.add_argument("--batch-size", type=int, default=None, help="texts per encoder call (default 64)")
    parser.add_argument("--index", choices=dense_index.INDEX_KINDS, default="flat", help="dense index kind")
    parser.add_argument("--query-prefix", default=None,
                        help='prefix for queries (default: "query: " for e5 encoders, else none); recorded')
    parser.add_argument("--passage-prefix", default=None,
                        help='prefix for passages (default: "passage: " for e5 encoders, else none); recorded')
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens per text (default: the encoder's sentence_bert_config or position limit)")
    parser.add_argument("--skip-bad-lines", action="store_true", help="skip and count malformed lines")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--restart", action="store_true", help="discard an interrupted build in OUT.partial")
    parser.add_argument("--device", action="store_true",
                        help="encode on the host's accelerators (default: the host CPU, so a build beside a "
                             "trainer never takes its TPU chips)")
    parser.add_argument("--chunk-docs", type=int, default=2048, help="documents encoded per streamed chunk")
    parser.add_argument("--shard-docs", type=int, default=102_400,
                        help="documents per resumable shard (a multiple of --chunk-docs)")
    defaults = dense_index.DenseIndexParams()
    parser.add_argument("--hnsw-m", type=int, default=defaults.hnsw_m)
    parser.add_argument("--hnsw-ef-construction", type=int, default=defaults.hnsw_ef_construction)
    parser.add_argument("--hnsw-ef-search", type=int, default=defaults.hnsw_ef_search)
    parser.add_argument("--nlist", type=int, default=defaults.ivf_nlist)
    parser.add_argument("--nprobe", type=int, default=defaults.ivf_nprobe)
    parser.add_argument("--pq-m", type=int, default=defaults.pq_m)
    parser.add_argument("--pq-bits", type=int, default=defaults.pq_bits)
    parser.add_argument("--train-size", type=int, default=defaults.train_size)
    args = parser.parse_args(argv)
    if args.import_faiss:
        args.backend = args.backend or "dense"
        if args.backend != "dense":
            parser.error("--import-faiss makes a dense index; drop --backend bm25")
    elif args.backend is None:
        parser.error("--backend is required (dense or bm25) unless --import-faiss")
    encoder_options = (args.encoder, args.query_prefix, args.passage_prefix, args.max_length)
    if args.backend == "bm25" and (any(o is not None for o in encoder_options) or args.index != "flat"):
        parser.error("--encoder, --index, --query-prefix, --passage-prefix and --max-length are for --backend dense")
    params = dense_index.DenseIndexParams(
        hnsw_m=args.hnsw_m, hnsw_ef_construction=args.hnsw_ef_construction, hnsw_ef_search=args.hnsw_ef_search,
        ivf_nlist=args.nlist, ivf_nprobe=args.nprobe, pq_m=args.pq_m, pq_bits=args.pq_bits,
        train_size=args.train_size)
    try:
        encoder = args.encoder
        if args.backend == "dense":
            from retrieval_service.encoder import TextEncoder

            encoder = TextEncoder(args.encoder, max_length=args.max_length, query_prefix=args.query_prefix,
                                  passage_prefix=args.passage_prefix, max_batch=args.batch_size or 64,
                                  runtime=args.encoder_runtime)
        if args.import_faiss:
            manifest = import_faiss_index(args.import_faiss, args.corpus, args.out, encoder=encoder,
                                          skip_bad_lines=args.skip_bad_lines, overwrite=args.overwrite)
        else:
            manifest = build_index(args.corpus, args.out, backend=args.backend, encoder=encoder,
                                   index_kind=args.index, params=params, skip_bad_lines=args.skip_bad_lines,
                                   chunk_docs=args.chunk_docs, shard_docs=args.shard_docs, restart=args.restart,
                                   overwrite=args.overwrite)
    except (CorpusError, FileExistsError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"build_index: error: {e}", file=sys.stderr)
        return 2
    skipped = manifest["corpus"]["bad_lines_skipped"]
    print(f"[build_index] wrote {args.out}: {manifest['num_documents']:,} documents, {manifest['backend']} "
          f"{manifest['index_kind']}, {manifest['build_seconds']} s"
          + (f"; skipped {skipped} bad lines (first: {manifest['corpus']['first_bad_line']})" if skipped else ""),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
