"""The index builder: both corpus formats, file:line errors, the on-disk document store, the manifest, and the
approximate faiss indexes' recall against Flat on a clustered corpus."""

import hashlib
import json
import random
import subprocess
import sys

import numpy as np
import pytest

from retrieval_service import dense_index
from retrieval_service.build_index import read_manifest
from retrieval_service.corpus import CorpusDocument, CorpusError, CorpusReader, parse_corpus_line
from retrieval_service.docstore import DocumentStore
from tests.fixtures.retrieval import RETRIEVAL_FACTS, write_search_r1_corpus


def run_builder(*args):
    return subprocess.run([sys.executable, "-m", "retrieval_service.build_index", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_both_corpus_line_formats_parse_to_the_same_document():
    search_r1 = parse_corpus_line(json.dumps({"id": 7, "contents": '"Paris"\nParis is the capital of France.'}))
    plain = parse_corpus_line(json.dumps({"id": "7", "title": "Paris", "text": "Paris is the capital of France."}))
    assert search_r1 == plain == CorpusDocument("7", "Paris", "Paris is the capital of France.")
    assert plain.contents == '"Paris"\nParis is the capital of France.'


def test_contents_that_are_not_title_newline_text_come_back_verbatim():
    doc = parse_corpus_line(json.dumps({"id": "1", "contents": "no title line here"}))
    assert (doc.title, doc.text, doc.contents) == ("", "no title line here", "no title line here")


@pytest.mark.parametrize("line, reason", [
    ('{"id": "1", "contents": "x"', "not valid JSON"),
    ('["id", "contents"]', "expected a JSON object, got list"),
    ('{"contents": "\\"T\\"\\ntext"}', 'missing "id"'),
    ('{"id": null, "contents": "x"}', '"id" must be a string or an integer, got NoneType'),
    ('{"id": "1", "contents": 5}', '"contents" must be a string, got int'),
    ('{"id": "1", "title": "T"}', 'needs "contents" (Search-R1 format) or "title" and "text"'),
    ('{"id": "1", "title": 3, "text": "x"}', '"title" must be a string, got int'),
])
def test_malformed_corpus_lines_are_rejected_with_a_reason(line, reason):
    with pytest.raises(ValueError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        parse_corpus_line(line)


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = [json.dumps({"id": str(i), "contents": f'"Doc {i}"\nText number {i}.'}) for i in range(4)]


def test_reader_names_file_and_line_of_a_bad_line(tmp_path):
    corpus = write_lines(tmp_path / "corpus.jsonl", GOOD[:2] + ['{"id": "x"'] + GOOD[2:])
    with pytest.raises(CorpusError, match=r"corpus\.jsonl:3: not valid JSON") as error:
        list(CorpusReader(corpus))
    assert error.value.line_number == 3


def test_build_stops_at_a_malformed_line_with_file_line_and_reason(tmp_path):
    corpus = write_lines(tmp_path / "corpus.jsonl", GOOD[:2] + ['{"id": "2", "title": "T"}'] + GOOD[2:])
    result = run_builder("--corpus", corpus, "--backend", "bm25", "--out", tmp_path / "index")
    assert result.returncode == 2
    assert f'{corpus}:3: needs "contents" (Search-R1 format) or "title" and "text"' in result.stderr
    assert not (tmp_path / "index").exists() and not (tmp_path / "index.partial").exists()


def test_skip_bad_lines_goes_on_and_counts_them(tmp_path):
    corpus = write_lines(tmp_path / "corpus.jsonl", [GOOD[0], "not json", GOOD[1], '{"id": 1}', GOOD[2], "", GOOD[3]])
    result = run_builder("--corpus", corpus, "--backend", "bm25", "--out", tmp_path / "index", "--skip-bad-lines")
    assert result.returncode == 0, result.stderr
    assert "skipped 2 bad lines" in result.stderr and "docs/s" in result.stderr and "ETA" in result.stderr
    manifest = read_manifest(tmp_path / "index")
    assert manifest["num_documents"] == 4
    assert manifest["corpus"]["bad_lines_skipped"] == 2
    assert manifest["corpus"]["first_bad_line"].endswith("corpus.jsonl:2: not valid JSON (Expecting value at column 1)")
    assert [DocumentStore(tmp_path / "index")[i].title for i in range(4)] == ["Doc 0", "Doc 1", "Doc 2", "Doc 3"]


def test_build_refuses_to_overwrite_an_existing_index(tmp_path, bm25_index):
    result = run_builder("--corpus", read_manifest(bm25_index)["corpus"]["path"], "--backend", "bm25",
                         "--out", bm25_index)
    assert result.returncode == 2 and "already exists; pass --overwrite" in result.stderr


def test_document_store_returns_every_corpus_document_by_row(dense_flat_index, retrieval_documents):
    store = DocumentStore(dense_flat_index)
    assert len(store) == len(retrieval_documents)
    for row, (title, text) in enumerate(retrieval_documents):
        assert store[row] == CorpusDocument(str(row), title, text)
    with pytest.raises(IndexError, match="row 50 outside"):
        store[50]


def test_manifest_records_encoder_dims_pooling_prefixes_and_corpus_hash(dense_flat_index, retrieval_corpus):
    manifest = read_manifest(dense_flat_index)
    assert (manifest["backend"], manifest["index_kind"], manifest["num_documents"]) == ("dense", "flat", 50)
    encoder = manifest["encoder"]
    assert (encoder["dim"], encoder["pooling"], encoder["normalize"]) == (384, "mean", "l2")
    assert (encoder["query_prefix"], encoder["passage_prefix"]) == ("", "")
    assert len(encoder["weights_sha256"]) == 64
    assert manifest["corpus"]["sha256"] == hashlib.sha256(retrieval_corpus.read_bytes()).hexdigest()


def test_dense_index_holds_the_encoder_passage_embeddings(dense_flat_index, retrieval_encoder, retrieval_documents):
    import faiss

    index = faiss.read_index(str(dense_flat_index / dense_index.INDEX_FILE))
    stored = index.reconstruct_n(0, index.ntotal)
    expected = retrieval_encoder.embed_passages([f'"{t}"\n{x}' for t, x in retrieval_documents])
    np.testing.assert_allclose(stored, expected, atol=2e-5)


# --- approximate indexes on a clustered corpus -------------------------------------------------------------------

TOPICS = {
    "astronomy": "planet star galaxy orbit telescope comet nebula moon asteroid cosmic solar eclipse",
    "cooking": "recipe oven garlic flour butter simmer sauce bake onion pepper dough spice",
    "football": "goal striker referee penalty league match stadium midfielder keeper tackle cup season",
    "finance": "stock bond market interest inflation dividend bank investor loan equity credit budget",
    "medicine": "patient doctor vaccine surgery disease symptom hospital therapy clinic nurse diagnosis virus",
    "music": "guitar melody chord concert orchestra rhythm album singer piano drum violin harmony",
    "law": "court judge lawyer contract verdict appeal statute trial jury evidence defendant ruling",
    "computing": "software compiler processor memory algorithm database network kernel server code program bug",
    "gardening": "soil seed compost flower shrub prune garden water bloom weed tomato harvest",
    "sailing": "boat sail harbor wind anchor mast deck crew keel voyage tide rudder",
}


def clustered_texts(per_topic, seed):
    rng = random.Random(seed)
    texts = []
    for words in TOPICS.values():
        vocab = words.split()
        texts += [" ".join(rng.choice(vocab) for _ in range(10)) for _ in range(per_topic)]
    return texts


def recall_at_k(approx_rows, exact_rows, k):
    return float(np.mean([len(set(a[:k]) & set(e[:k])) / k for a, e in zip(approx_rows, exact_rows)]))


def test_hnsw_and_ivfpq_recall_at_3_against_flat_on_a_clustered_corpus(retrieval_encoder, tmp_path,
                                                                        record_property):
    import faiss

    passages = retrieval_encoder.embed_passages(clustered_texts(per_topic=60, seed=0))
    queries = retrieval_encoder.embed_queries(clustered_texts(per_topic=6, seed=1))
    params = dense_index.DenseIndexParams(hnsw_m=16, hnsw_ef_construction=100, hnsw_ef_search=32, ivf_nlist=10,
                                          ivf_nprobe=3, pq_m=48, pq_bits=6)
    rows = {}
    for kind in dense_index.INDEX_KINDS:
        writer = dense_index.DenseIndexWriter(kind, passages.shape[1], params)
        for start in range(0, len(passages), 256):  # streamed, as the builder does
            writer.add(passages[start:start + 256])
        path = tmp_path / f"{kind}.faiss"
        faiss.write_index(writer.finish(), str(path))
        searcher = dense_index.DenseSearcher(path, kind, flat_kernel="faiss")
        _, rows[kind] = searcher.search(queries, 3)
    recall = {kind: recall_at_k(rows[kind], rows["flat"], 3) for kind in ("flat16", "hnsw", "ivfpq")}
    print(f"recall@3 vs Flat on {len(passages)} clustered passages, {len(queries)} queries: "
          f"HNSW(M=16, efSearch=32) {recall['hnsw']:.3f}, IVF-PQ(nlist=10, nprobe=3, m=48x6 bits) "
          f"{recall['ivfpq']:.3f}")
    record_property("recall_at_3", recall)
    assert recall["flat16"] >= 0.99
    assert recall["hnsw"] >= 0.9
    assert recall["ivfpq"] >= 0.5


def test_numpy_flat_kernel_equals_faiss_flat_search(dense_flat_index):
    path = dense_flat_index / dense_index.INDEX_FILE
    queries = np.random.default_rng(0).standard_normal((7, 384)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    np_scores, np_rows = dense_index.DenseSearcher(path, "flat", flat_kernel="numpy").search(queries, 5)
    fa_scores, fa_rows = dense_index.DenseSearcher(path, "flat", flat_kernel="faiss").search(queries, 5)
    np.testing.assert_array_equal(np_rows, fa_rows)
    np.testing.assert_allclose(np_scores, fa_scores, atol=1e-5)


def test_blockwise_top_k_equals_a_full_sort():
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((1000, 16)).astype(np.float32)
    queries = rng.standard_normal((4, 16)).astype(np.float32)
    scores, rows = dense_index.top_k_inner_product(queries, vectors, 10, block_rows=64)
    full = queries @ vectors.T
    np.testing.assert_array_equal(rows, np.argsort(-full, axis=1, kind="stable")[:, :10])
    np.testing.assert_allclose(scores, np.take_along_axis(full, rows, axis=1))


# --- importing Search-R1's prebuilt index ------------------------------------------------------------------------

def write_search_r1_flat_index(path, vectors):
    """The layout Search-R1's index_builder.py writes: index_factory(dim, "Flat", inner product) over unit vectors."""
    import faiss

    index = faiss.index_factory(vectors.shape[1], "Flat", faiss.METRIC_INNER_PRODUCT)
    index.add(np.ascontiguousarray(vectors, np.float32))
    faiss.write_index(index, str(path))
    return path


@pytest.fixture(scope="module")
def search_r1_index(tmp_path_factory, retrieval_documents, retrieval_encoder):
    """e5_Flat.index-style file over the test corpus, encoded the way Search-R1 does (PyTorch BertModel, fp32)."""
    from tests.fixtures.retrieval import torch_reference_embeddings

    vectors = torch_reference_embeddings(retrieval_encoder.model_dir, [f'"{t}"\n{x}' for t, x in retrieval_documents],
                                         retrieval_encoder.max_length)
    return write_search_r1_flat_index(tmp_path_factory.mktemp("search-r1") / "minilm_Flat.index", vectors)


def test_imported_search_r1_index_answers_like_a_native_build(search_r1_index, retrieval_corpus, dense_flat_index,
                                                              retrieval_encoder, tmp_path):
    from retrieval_service.build_index import import_faiss_index
    from retrieval_service.searcher import Searcher

    manifest = import_faiss_index(search_r1_index, retrieval_corpus, tmp_path / "imported", encoder=retrieval_encoder)
    assert manifest["vectors"]["source"] == "imported" and manifest["vectors"]["faiss_type"] == "IndexFlatIP"
    assert manifest["vectors"]["sample_check"]["min_cosine"] > 0.9999 and manifest["num_documents"] == 50
    assert (tmp_path / "imported" / dense_index.INDEX_FILE).read_bytes() == search_r1_index.read_bytes()

    queries = [q for q, _, _ in RETRIEVAL_FACTS] + ["largest planet", "Russian novel", "atomic number 8"]
    imported = Searcher(tmp_path / "imported").retrieve(queries, 5)
    native = Searcher(dense_flat_index).retrieve(queries, 5)
    assert [[d.id for d, _ in q] for q in imported] == [[d.id for d, _ in q] for q in native]
    np.testing.assert_allclose([[s for _, s in q] for q in imported], [[s for _, s in q] for q in native], atol=2e-5)
    assert DocumentStore(tmp_path / "imported")[3] == DocumentStore(dense_flat_index)[3]


def test_import_with_a_count_mismatch_fails_naming_both_numbers(search_r1_index, retrieval_documents, tmp_path):
    corpus = tmp_path / "longer.jsonl"
    write_search_r1_corpus(corpus, retrieval_documents + [("Extra", "One passage too many.")])
    result = run_builder("--import-faiss", search_r1_index, "--corpus", corpus, "--out", tmp_path / "index")
    assert result.returncode == 2
    assert f"{search_r1_index} holds 50 vectors but {corpus} has 51 documents" in result.stderr
    assert not (tmp_path / "index").exists() and not (tmp_path / "index.partial").exists()


def test_import_with_a_dimension_mismatch_fails_naming_both_numbers(retrieval_corpus, tmp_path):
    vectors = np.random.default_rng(0).standard_normal((50, 768)).astype(np.float32)
    index = write_search_r1_flat_index(tmp_path / "e5_Flat.index", vectors / np.linalg.norm(vectors, axis=1)[:, None])
    result = run_builder("--import-faiss", index, "--corpus", retrieval_corpus, "--out", tmp_path / "index")
    assert result.returncode == 2 and "holds 768-d vectors but the encoder" in result.stderr
    assert "makes 384-d ones" in result.stderr


def test_import_of_vectors_from_another_encoder_or_order_is_refused(retrieval_corpus, retrieval_encoder,
                                                                     retrieval_documents, tmp_path):
    from retrieval_service.build_index import import_faiss_index

    shuffled = retrieval_encoder.embed_passages([f'"{t}"\n{x}' for t, x in retrieval_documents])[::-1]
    index = write_search_r1_flat_index(tmp_path / "shuffled.index", shuffled)
    with pytest.raises(ValueError, match=r"passage \d+ of .* has cosine -?0\.\d+ with vector \d+ of .*shuffled"):
        import_faiss_index(index, retrieval_corpus, tmp_path / "index", encoder=retrieval_encoder)


# --- resumable builds ---------------------------------------------------------------------------------------------

class StopAfter:
    """Wraps an encoder; raises KeyboardInterrupt (Ctrl-C) on the n-th passage batch."""

    def __init__(self, encoder, calls: int):
        self._encoder, self._left = encoder, calls

    def __getattr__(self, name):
        return getattr(self._encoder, name)

    def embed_passages(self, texts):
        self._left -= 1
        if self._left == 0:
            raise KeyboardInterrupt
        return self._encoder.embed_passages(texts)


def build_small(corpus, out, encoder, **kwargs):
    from retrieval_service.build_index import build_index

    return build_index(corpus, out, backend="dense", encoder=encoder, chunk_docs=8, shard_docs=16,
                       progress_every_s=0, **kwargs)


def index_files(index_dir):
    import faiss

    index = faiss.read_index(str(index_dir / dense_index.INDEX_FILE))
    return (index.reconstruct_n(0, index.ntotal), (index_dir / "docs.jsonl").read_bytes(),
            (index_dir / "docs.offsets.int64").read_bytes())


@pytest.fixture(scope="module")
def uninterrupted_build(tmp_path_factory, retrieval_corpus, retrieval_encoder):
    out = tmp_path_factory.mktemp("uninterrupted") / "index"
    build_small(retrieval_corpus, out, retrieval_encoder)
    return out


def interrupt_at_batch(monkeypatch, encoder, n):
    """The n-th passage batch raises KeyboardInterrupt (Ctrl-C), like a build stopped by hand."""
    calls = [0]
    original = encoder.embed_passages

    def embed_passages(texts):
        calls[0] += 1
        if calls[0] == n:
            raise KeyboardInterrupt
        return original(texts)

    monkeypatch.setattr(encoder, "embed_passages", embed_passages)


# 50 documents, chunks of 8, shards of 16. Stopped at batch 3: shard 0 sealed, the store already holding documents of
# shard 1. At batch 6: shards 0-1 sealed, half of shard 2's vectors in its .part file.
@pytest.mark.parametrize("stop_at_batch, sealed", [(3, 1), (6, 2)])
def test_an_interrupted_build_resumes_from_its_last_shard_and_ends_identical(
        stop_at_batch, sealed, retrieval_corpus, retrieval_encoder, uninterrupted_build, tmp_path, monkeypatch,
        capsys):
    out = tmp_path / "index"
    with monkeypatch.context() as patch:
        interrupt_at_batch(patch, retrieval_encoder, stop_at_batch)
        with pytest.raises(KeyboardInterrupt):
            build_small(retrieval_corpus, out, retrieval_encoder)
    state = json.loads((tmp_path / "index.partial" / "build_state.json").read_text())
    assert len(state["shards"]) == sealed and not out.exists()
    assert f"{sealed} finished shards kept in {tmp_path / 'index.partial'}" in capsys.readouterr().err

    manifest = build_small(retrieval_corpus, out, retrieval_encoder)

    assert f"resuming {tmp_path / 'index.partial'}: {sealed} shards, {16 * sealed} documents" in capsys.readouterr().err
    assert manifest["num_documents"] == 50 and not (tmp_path / "index.partial").exists()
    vectors, records, offsets = index_files(out)
    expected_vectors, expected_records, expected_offsets = index_files(uninterrupted_build)
    assert vectors.tobytes() == expected_vectors.tobytes()  # byte-identical
    assert (records, offsets) == (expected_records, expected_offsets)


def test_a_resume_with_other_arguments_or_another_corpus_is_refused_naming_the_difference(
        retrieval_corpus, retrieval_documents, retrieval_encoder, tmp_path, monkeypatch):
    from retrieval_service.build_index import build_index
    from retrieval_service.build_shards import ResumeMismatch

    out = tmp_path / "index"
    with monkeypatch.context() as patch:
        interrupt_at_batch(patch, retrieval_encoder, 4)
        with pytest.raises(KeyboardInterrupt):
            build_small(retrieval_corpus, out, retrieval_encoder)
    with pytest.raises(ResumeMismatch, match=r"1 finished shards of a build with another corpus or other arguments: "
                                             r"index_kind: 'flat' then, 'flat16' now; shard_docs: 16 then, 24 now"):
        build_index(retrieval_corpus, out, backend="dense", encoder=retrieval_encoder, chunk_docs=8, shard_docs=24,
                    index_kind="flat16")
    edited = tmp_path / "edited.jsonl"
    write_search_r1_corpus(edited, retrieval_documents[:49] + [("Pluto", "Pluto is a dwarf planet.")])
    result = run_builder("--corpus", edited, "--backend", "dense", "--out", out, "--chunk-docs", 8, "--shard-docs", 16)
    assert result.returncode == 2 and "corpus.sha256: '" in result.stderr and "--restart" in result.stderr
    assert "corpus.bytes" in result.stderr
    result = run_builder("--corpus", edited, "--backend", "dense", "--out", out, "--chunk-docs", 8, "--shard-docs", 16,
                         "--restart")
    assert result.returncode == 0, result.stderr
    assert DocumentStore(out)[49].title == "Pluto"


def test_streamed_flat_index_file_is_the_one_faiss_writes(tmp_path):
    import faiss

    vectors = np.random.default_rng(2).standard_normal((300, 24)).astype(np.float32)
    index = faiss.IndexFlatIP(24)
    index.add(vectors)
    faiss.write_index(index, str(tmp_path / "faiss.index"))
    assert dense_index.write_flat_index(tmp_path / "streamed.index", [vectors[:100], vectors[100:]], 24) == 300
    assert (tmp_path / "streamed.index").read_bytes() == (tmp_path / "faiss.index").read_bytes()


@pytest.mark.parametrize("kind", ["flat", "flat16"])
def test_memory_mapped_index_searches_like_the_loaded_one_and_faiss(kind, retrieval_encoder, tmp_path):
    import faiss

    passages = retrieval_encoder.embed_passages(clustered_texts(per_topic=20, seed=3))
    writer = dense_index.DenseIndexWriter(kind, passages.shape[1])
    writer.add(passages)
    faiss.write_index(writer.finish(), str(tmp_path / "index.faiss"))
    queries = retrieval_encoder.embed_queries(clustered_texts(per_topic=2, seed=4))
    results = {(kernel, mmap): dense_index.DenseSearcher(tmp_path / "index.faiss", kind, flat_kernel=kernel,
                                                         mmap=mmap).search(queries, 5)
               for kernel in dense_index.FLAT_KERNELS for mmap in (False, True)}
    reference_scores, reference_rows = results[("faiss", False)]
    for scores, rows in results.values():
        np.testing.assert_array_equal(rows, reference_rows)
        np.testing.assert_allclose(scores, reference_scores, atol=1e-5)
    if kind == "flat16":  # fp16 storage: scores within fp16 rounding of the exact fp32 ones
        np.testing.assert_allclose(reference_scores, np.take_along_axis(queries @ passages.T, reference_rows, 1),
                                   atol=2e-3)
