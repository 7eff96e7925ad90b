"""A BERT-family text encoder in Flax NNX (device side): embeddings, post-LN encoder layers, mean pooling, L2 norm.

Covers the sentence encoders Search-R1 style retrievers use (all-MiniLM-L6-v2, e5-base-v2): absolute position
embeddings, one token type, no pooler head (sentence embeddings are the masked mean of the last hidden states).
Weights come from an HF checkpoint through `bert_jax.load_bert` — this module only knows shapes and math.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from retrieval_service.bert_weights import BertConfig

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF "gelu" is the exact erf form
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def _layer_norm(cfg, rngs, dtype):
    # use_fast_variance=False: E[(x-mean)^2] like PyTorch, so embeddings match the HF reference closely.
    return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, use_fast_variance=False, dtype=dtype,
                         rngs=rngs)


class BertEmbeddings(nnx.Module):
    def __init__(self, cfg: BertConfig, *, dtype, rngs: nnx.Rngs):
        self.word = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.position = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.token_type = nnx.Embed(cfg.type_vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.norm = _layer_norm(cfg, rngs, dtype)

    def __call__(self, token_ids):
        """token_ids: int32[B, T] -> float[B, T, H] (token type 0 everywhere: single-segment inputs)."""
        positions = jnp.arange(token_ids.shape[1])[None, :]
        x = self.word(token_ids) + self.position(positions) + self.token_type(jnp.zeros_like(token_ids))
        return self.norm(x)


class SelfAttention(nnx.Module):
    def __init__(self, cfg: BertConfig, *, dtype, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.query = nnx.Linear(h, h, dtype=dtype, rngs=rngs)
        self.key = nnx.Linear(h, h, dtype=dtype, rngs=rngs)
        self.value = nnx.Linear(h, h, dtype=dtype, rngs=rngs)
        self.output = nnx.Linear(h, h, dtype=dtype, rngs=rngs)

    def __call__(self, x, key_mask):
        """x: float[B, T, H], key_mask: bool[B, T] (True = real token) -> float[B, T, H]."""
        b, t, h = x.shape
        split = lambda y: y.reshape(b, t, self.num_heads, h // self.num_heads)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = jnp.einsum("bqnd,bknd->bnqk", q, k) / jnp.sqrt(jnp.asarray(h // self.num_heads, x.dtype))
        scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(x.dtype)
        return self.output(jnp.einsum("bnqk,bknd->bqnd", weights, v).reshape(b, t, h))


class BertLayer(nnx.Module):
    """Post-LN transformer layer: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

    def __init__(self, cfg: BertConfig, *, dtype, rngs: nnx.Rngs):
        self.attention = SelfAttention(cfg, dtype=dtype, rngs=rngs)
        self.attention_norm = _layer_norm(cfg, rngs, dtype)
        self.intermediate = nnx.Linear(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, rngs=rngs)
        self.ffn_output = nnx.Linear(cfg.intermediate_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.ffn_norm = _layer_norm(cfg, rngs, dtype)
        self.activation = _ACTIVATIONS[cfg.hidden_act]

    def __call__(self, x, key_mask):
        x = self.attention_norm(x + self.attention(x, key_mask))
        return self.ffn_norm(x + self.ffn_output(self.activation(self.intermediate(x))))


class BertEncoder(nnx.Module):
    def __init__(self, cfg: BertConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.embeddings = BertEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([BertLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])

    def __call__(self, token_ids, attention_mask):
        """token_ids: int32[B, T], attention_mask: bool[B, T] -> last hidden states float[B, T, H]."""
        x = self.embeddings(token_ids)
        for layer in self.layers:
            x = layer(x, attention_mask)
        return x


def mean_pool(hidden, attention_mask):
    """Masked mean over tokens. hidden: float[B, T, H], attention_mask: bool[B, T] -> float32[B, H].

    All-padding rows (batch padding) give zeros, not NaN: the count is clamped like sentence-transformers does.
    """
    mask = attention_mask.astype(jnp.float32)[..., None]
    total = jnp.sum(hidden.astype(jnp.float32) * mask, axis=1)
    return total / jnp.maximum(jnp.sum(mask, axis=1), 1e-9)


def l2_normalize(x, eps=1e-12):
    """x: float32[B, H] -> unit rows (zero rows stay zero), like torch.nn.functional.normalize."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def sentence_embeddings(model: BertEncoder, token_ids, attention_mask):
    """token_ids: int32[B, T], attention_mask: bool[B, T] -> float32[B, H], L2-normalised mean-pooled states."""
    return l2_normalize(mean_pool(model(token_ids, attention_mask), attention_mask))
