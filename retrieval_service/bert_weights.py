"""A BERT-family checkpoint on disk (HF config.json + model.safetensors), read without any ML framework.

Both encoder runtimes start here: the Flax model (bert.py, the reference, used on accelerators) and the ONNX graph
(bert_onnx.py, ONNX Runtime on CPU). Tensors are returned as NumPy arrays under their canonical HF BertModel names
("encoder.layer.0.attention.self.query.weight", ...), whatever prefix or LayerNorm naming the checkpoint used.
"""

import dataclasses
import json
import pathlib

import numpy as np
from safetensors import safe_open

ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    @classmethod
    def from_hf(cls, model_dir) -> "BertConfig":
        path = pathlib.Path(model_dir) / "config.json"
        try:
            hf = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no config.json; --encoder must be an HF BERT directory") from None
        if hf.get("model_type") not in ("bert", None):
            raise ValueError(f"{path}: model_type {hf.get('model_type')!r} is not a BERT-family encoder")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: position_embedding_type {hf['position_embedding_type']!r} is not supported")
        if hf.get("hidden_act", "gelu") not in ACTIVATIONS:
            raise ValueError(f"{path}: hidden_act {hf['hidden_act']!r} is not one of {sorted(ACTIVATIONS)}")
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2), layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            hidden_act=hf.get("hidden_act", "gelu"),
        )


def tensor_shapes(cfg: BertConfig) -> dict[str, tuple[int, ...]]:
    """Canonical HF BertModel tensor name -> shape as stored (torch Linear weights are [out, in])."""
    h, f = cfg.hidden_size, cfg.intermediate_size
    shapes = {
        "embeddings.word_embeddings.weight": (cfg.vocab_size, h),
        "embeddings.position_embeddings.weight": (cfg.max_position_embeddings, h),
        "embeddings.token_type_embeddings.weight": (cfg.type_vocab_size, h),
        "embeddings.LayerNorm.weight": (h,),
        "embeddings.LayerNorm.bias": (h,),
    }
    for i in range(cfg.num_layers):
        p = f"encoder.layer.{i}."
        for name, (out_dim, in_dim) in (("attention.self.query", (h, h)), ("attention.self.key", (h, h)),
                                        ("attention.self.value", (h, h)), ("attention.output.dense", (h, h)),
                                        ("intermediate.dense", (f, h)), ("output.dense", (h, f))):
            shapes[p + name + ".weight"] = (out_dim, in_dim)
            shapes[p + name + ".bias"] = (out_dim,)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[p + name + ".weight"] = (h,)
            shapes[p + name + ".bias"] = (h,)
    return shapes


def _stored_names(name: str) -> list[str]:
    """Where a canonical tensor may sit in a checkpoint: BertForX nests it under "bert.", old ones say gamma/beta."""
    candidates = [name, "bert." + name]
    if name.endswith("LayerNorm.weight"):
        candidates += [c.replace("LayerNorm.weight", "LayerNorm.gamma") for c in candidates]
    if name.endswith("LayerNorm.bias"):
        candidates += [c.replace("LayerNorm.bias", "LayerNorm.beta") for c in candidates]
    return candidates


def read_bert_tensors(model_dir, cfg: BertConfig) -> dict[str, np.ndarray]:
    """Every tensor the encoder needs, float32, shape-checked; errors name the file and the tensor."""
    weights_path = pathlib.Path(model_dir) / "model.safetensors"
    if not weights_path.exists():
        raise FileNotFoundError(f"{weights_path}: missing; the encoder directory needs safetensors weights")
    tensors = {}
    with safe_open(weights_path, framework="np") as weights:
        stored = set(weights.keys())
        for name, shape in tensor_shapes(cfg).items():
            found = next((c for c in _stored_names(name) if c in stored), None)
            if found is None:
                raise KeyError(f"{weights_path}: tensor {name!r} is missing")
            array = weights.get_tensor(found)
            if array.shape != shape:
                raise ValueError(f"{weights_path}: tensor {found!r} has shape {array.shape}, the config needs {shape}")
            tensors[name] = np.asarray(array, np.float32)
    return tensors
