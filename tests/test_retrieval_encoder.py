"""The sentence encoder's two runtimes — the Flax BERT (reference, data-parallel over local devices) and the ONNX
Runtime graph (CPU) — give the same embeddings as transformers' PyTorch BertModel + mean pooling + L2 norm."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from retrieval_service.bert_jax import load_bert
from retrieval_service.encoder import TextEncoder, default_encoder_dir
from tests.fixtures.retrieval import torch_reference_embeddings

TEXTS = [
    "What is the capital of France?",
    "Paris is the capital of France. It is the seat of the government of France.",
    "a",
    # 300+ WordPieces: exercises truncation at the checkpoint's max_seq_length (256 for all-MiniLM-L6-v2).
    " ".join(["The quick brown fox jumps over the lazy dog near the riverbank."] * 30),
]
# Unit vectors computed in fp32 by two stacks (XLA vs PyTorch kernels): agreement to ~1e-6 is observed.
TOLERANCE = 2e-5


@pytest.fixture(scope="module")
def jax_encoder():
    return TextEncoder(runtime="jax")  # all 8 host devices of the test process


@pytest.fixture(scope="module", params=["onnx", "jax"])
def encoder_of_each_runtime(request, retrieval_encoder, jax_encoder):
    encoder = {"onnx": retrieval_encoder, "jax": jax_encoder}[request.param]
    assert encoder.runtime == request.param
    return encoder


def test_each_runtime_matches_pytorch_bert_with_mean_pooling(encoder_of_each_runtime):
    ours = encoder_of_each_runtime.embed(TEXTS)
    reference = torch_reference_embeddings(default_encoder_dir(), TEXTS, encoder_of_each_runtime.max_length)
    assert ours.dtype == np.float32 and ours.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(ours, reference, atol=TOLERANCE)


def test_onnx_runtime_matches_the_flax_reference(retrieval_encoder, jax_encoder, retrieval_documents):
    texts = [f'"{title}"\n{text}' for title, text in retrieval_documents]  # one (64, 32) batch: one compile
    np.testing.assert_allclose(retrieval_encoder.embed(texts), jax_encoder.embed(texts), atol=TOLERANCE)


def test_the_default_runtime_on_a_cpu_host_is_onnx(retrieval_encoder):
    assert retrieval_encoder.runtime == "onnx" and "onnxruntime" in retrieval_encoder.runtime_description


def test_eight_devices_encode_the_same_vectors_as_one(jax_encoder, retrieval_documents):
    import jax

    assert len(jax.local_devices()) == 8 and "x8" in jax_encoder._runner.platform
    one = TextEncoder(runtime="jax", devices=jax.local_devices()[:1])
    texts = [f'"{title}"\n{text}' for title, text in retrieval_documents]
    sharded, single = jax_encoder.embed(texts), one.embed(texts)
    assert jax_encoder.max_batch % 8 == 0
    np.testing.assert_allclose(sharded, single, atol=1e-6)


def test_embedding_does_not_depend_on_batch_padding(encoder_of_each_runtime):
    alone = encoder_of_each_runtime.embed([TEXTS[0]])
    with_longer_neighbours = encoder_of_each_runtime.embed(TEXTS)[:1]
    np.testing.assert_allclose(alone, with_longer_neighbours, atol=TOLERANCE)


def test_default_encoder_is_minilm_without_prefixes(retrieval_encoder):
    info = retrieval_encoder.describe()
    assert (info["dim"], info["pooling"], info["max_length"]) == (384, "mean", 256)
    assert info["query_prefix"] == info["passage_prefix"] == ""


@pytest.fixture(scope="module")
def tiny_e5_dir(tmp_path_factory):
    """A 2-layer random BERT saved by transformers under an e5-style name, with MiniLM's tokenizer files."""
    from transformers import BertConfig, BertModel

    out = tmp_path_factory.mktemp("encoders") / "e5-tiny-v2"
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(out)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(default_encoder_dir() / name, out / name)
    return out


@pytest.mark.parametrize("runtime", ["onnx", "jax"])
def test_e5_encoder_adds_query_and_passage_prefixes(tiny_e5_dir, runtime):
    encoder = TextEncoder(tiny_e5_dir, runtime=runtime)
    assert (encoder.query_prefix, encoder.passage_prefix) == ("query: ", "passage: ")
    assert encoder.max_length == 128  # no sentence_bert_config.json: the model's position limit
    np.testing.assert_allclose(encoder.embed_queries(["who wrote hamlet"]), encoder.embed(["query: who wrote hamlet"]))
    np.testing.assert_allclose(encoder.embed_passages(["Hamlet"]), encoder.embed(["passage: Hamlet"]))
    reference = torch_reference_embeddings(tiny_e5_dir, ["query: who wrote hamlet"], 128)
    np.testing.assert_allclose(encoder.embed_queries(["who wrote hamlet"]), reference, atol=TOLERANCE)


def test_missing_weight_is_reported_with_file_and_tensor_name(tiny_e5_dir, tmp_path):
    broken = tmp_path / "broken-encoder"
    shutil.copytree(tiny_e5_dir, broken)
    weights = load_file(broken / "model.safetensors")
    del weights["encoder.layer.1.attention.self.key.weight"]
    save_file(weights, broken / "model.safetensors")
    with pytest.raises(KeyError, match=r"model\.safetensors.*encoder\.layer\.1\.attention\.self\.key\.weight"):
        load_bert(broken)


def test_unsupported_architecture_is_rejected_with_the_config_path(tiny_e5_dir, tmp_path):
    other = tmp_path / "not-bert"
    shutil.copytree(tiny_e5_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "qwen2"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"not-bert/config\.json: model_type 'qwen2'"):
        load_bert(other)


def test_tokenizer_json_gives_the_token_ids_of_transformers_fast_tokenizer(retrieval_encoder):
    from transformers import AutoTokenizer

    texts = TEXTS + ["Ünïcödé  ТЕКСТ 東京 🙂 tabs\tand\nnewlines", "  leading and trailing  "]
    reference = AutoTokenizer.from_pretrained(str(default_encoder_dir()))(
        texts, truncation=True, max_length=retrieval_encoder.max_length)["input_ids"]
    assert retrieval_encoder.tokenize(texts) == reference
    assert max(len(ids) for ids in reference) == retrieval_encoder.max_length == 256  # truncation exercised
