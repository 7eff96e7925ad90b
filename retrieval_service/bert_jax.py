"""Runs the Flax BERT of bert.py jitted and data-parallel over every local device: the accelerator path of TextEncoder.

The parameters are replicated on a one-axis mesh ("data") of `jax.local_devices()` and each padded batch is split
by rows across it, so a TPU VM's 4 or 8 chips all encode. Batches are padded to (batch, length) buckets — batch a
multiple of the device count, length from a fine ladder — so jit compiles a handful of shapes however ragged the
text is (`enable_compile_cache` keeps them across processes).

    runner = JaxBertRunner(cfg, read_bert_tensors(model_dir, cfg), max_batch=128)
    vectors = runner(token_ids, mask)   # int32[B, T], bool[B, T] -> float32[B, H] unit rows
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from retrieval_service.bert import BertEncoder, sentence_embeddings
from retrieval_service.bert_weights import BertConfig, read_bert_tensors

# Padding to the batch's longest text, rounded up to this ladder: step 8 up to 64 tokens, then ~12% apart.
LENGTH_BUCKETS = (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def enable_compile_cache(cache_dir) -> None:
    """Persists jit compilations across processes: a restarted server reuses its compiled shapes (8 s -> 2 s)."""
    if cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(cache_dir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def default_compile_cache_dir() -> pathlib.Path:
    from retrieval_service.encoder import cache_root

    return cache_root() / "jax"


def _hf_tensor_targets(model: BertEncoder) -> dict:
    """HF BertModel tensor name -> (nnx Variable, transpose?) for every parameter of `model`."""
    emb = model.embeddings
    targets = {
        "embeddings.word_embeddings.weight": (emb.word.embedding, False),
        "embeddings.position_embeddings.weight": (emb.position.embedding, False),
        "embeddings.token_type_embeddings.weight": (emb.token_type.embedding, False),
        "embeddings.LayerNorm.weight": (emb.norm.scale, False),
        "embeddings.LayerNorm.bias": (emb.norm.bias, False),
    }
    for i, layer in enumerate(model.layers):
        p = f"encoder.layer.{i}."
        for hf_name, linear in (("attention.self.query", layer.attention.query),
                                ("attention.self.key", layer.attention.key),
                                ("attention.self.value", layer.attention.value),
                                ("attention.output.dense", layer.attention.output),
                                ("intermediate.dense", layer.intermediate),
                                ("output.dense", layer.ffn_output)):
            targets[p + hf_name + ".weight"] = (linear.kernel, True)  # torch Linear stores [out, in]
            targets[p + hf_name + ".bias"] = (linear.bias, False)
        for hf_name, norm in (("attention.output.LayerNorm", layer.attention_norm),
                              ("output.LayerNorm", layer.ffn_norm)):
            targets[p + hf_name + ".weight"] = (norm.scale, False)
            targets[p + hf_name + ".bias"] = (norm.bias, False)
    return targets


def bert_from_tensors(cfg: BertConfig, tensors: dict[str, np.ndarray], *, dtype=jnp.float32,
                      param_dtype=jnp.float32) -> BertEncoder:
    model = nnx.eval_shape(lambda: BertEncoder(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    for name, (variable, transpose) in _hf_tensor_targets(model).items():
        array = tensors[name]
        variable.set_value(jnp.asarray(array.T if transpose else array, dtype=param_dtype))
    return model


def load_bert(model_dir, *, dtype=jnp.float32, param_dtype=jnp.float32) -> tuple[BertConfig, BertEncoder]:
    """Builds a BertEncoder from an HF directory (config.json + model.safetensors); errors name the tensor."""
    cfg = BertConfig.from_hf(model_dir)
    return cfg, bert_from_tensors(cfg, read_bert_tensors(model_dir, cfg), dtype=dtype, param_dtype=param_dtype)


def _bucket(n: int, ladder) -> int:
    return next(b for b in ladder if b >= n)


class JaxBertRunner:
    """The Flax encoder, data-parallel over `devices` (default: all local devices).

    max_batch: the largest padded batch (rounded up to a multiple of the device count); smaller batches are padded
    to power-of-two multiples of the device count.
    """

    def __init__(self, cfg: BertConfig, tensors: dict[str, np.ndarray], *, max_batch: int, max_length: int,
                 devices=None, dtype=jnp.float32):
        devices = list(devices) if devices is not None else jax.local_devices()
        n = len(devices)
        self.batch_multiple = n
        max_batch = -(-max_batch // n) * n
        per_device = max_batch // n
        self.max_batch = max_batch
        self.batch_buckets = tuple(sorted({min(2 ** i, per_device) * n for i in range(per_device.bit_length() + 1)}))
        self.length_buckets = tuple(b for b in LENGTH_BUCKETS if b < max_length) + (max_length,)
        self.mesh = Mesh(np.asarray(devices), ("data",))
        rows = NamedSharding(self.mesh, PartitionSpec("data"))
        replicated = NamedSharding(self.mesh, PartitionSpec())
        graphdef, state = nnx.split(bert_from_tensors(cfg, tensors, dtype=dtype))
        self._state = jax.device_put(state, replicated)
        self._rows = rows
        self._forward = jax.jit(lambda st, ids, mask: sentence_embeddings(nnx.merge(graphdef, st), ids, mask),
                                in_shardings=(replicated, rows, rows), out_shardings=rows)
        kinds = sorted({d.platform for d in devices})
        self.platform = f"jax-{'/'.join(kinds)} x{n}"
        self.description = f"JAX {jax.__version__} (Flax BERT, XLA) on {n} {'/'.join(kinds)} device(s), {jnp.dtype(dtype).name}"

    def __call__(self, token_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """token_ids: int32[B, T], mask: bool[B, T] -> float32[B, H]; padded to a bucket, the padding dropped."""
        n, t = token_ids.shape
        b, tb = _bucket(n, self.batch_buckets), _bucket(t, self.length_buckets)
        ids = np.zeros((b, tb), np.int32)
        full_mask = np.zeros((b, tb), bool)
        ids[:n, :t], full_mask[:n, :t] = token_ids, mask
        return np.asarray(self._forward(self._state, ids, full_mask))[:n]

    def warmup(self, lengths) -> None:
        """Compiles every batch bucket at the length buckets of `lengths` ahead of traffic."""
        for t in {_bucket(min(t, self.length_buckets[-1]), self.length_buckets) for t in lengths}:
            for b in self.batch_buckets:
                self._forward(self._state, np.zeros((b, t), np.int32), np.ones((b, t), bool))
