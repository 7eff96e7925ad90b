"""Hugging Face Qwen2 checkpoints in and out, without torch.

Import reads each tensor straight from the memory-mapped safetensors file into the shards of its target sharding
(`jax.make_array_from_callback`, each device reading only its own slice), so no process ever holds a full host copy
of the model. bf16 checkpoints (every published Qwen2.5) are read by viewing the raw bytes as ml_dtypes.bfloat16.

Export writes `config.json` and `model.safetensors` (or numbered shards plus `model.safetensors.index.json`) tensor
by tensor; `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads the result.

The tensor layout map between the Hugging Face module tree and ours is `param_layouts(cfg)`: one entry per
parameter, a reshape of the HF tensor followed by a transpose (and the inverse on export).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import struct
import sys
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from tspo_jax import sharding
from tspo_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM

INDEX_FILE = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
# Buffers transformers recomputes and never needs from a checkpoint.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# --- the layout map ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
    """Our parameter = hf_tensor.reshape(split_shape).transpose(perm); hf_shape is the tensor's shape on disk."""

    hf_name: str
    hf_shape: tuple[int, ...]
    split_shape: tuple[int, ...]
    perm: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        """The parameter's shape in our model."""
        return tuple(self.split_shape[i] for i in self.perm)

    def to_ours(self, hf: np.ndarray) -> np.ndarray:
        """A view (no copy, also on memory maps) of the HF tensor in our layout."""
        return hf.reshape(self.split_shape).transpose(self.perm)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        return ours.transpose(np.argsort(self.perm)).reshape(self.hf_shape)


@dataclasses.dataclass(frozen=True)
class StackedLayout:
    """A scanned model's parameter: layer i's slice [i] is stored as the HF tensor layers[i] (its own Layout)."""

    layers: tuple[Layout, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.layers), *self.layers[0].shape)


def hf_tensors(layout: Layout | StackedLayout) -> list[tuple[int | None, Layout]]:
    """(layer index or None, Layout) of every HF tensor one parameter is made of."""
    if isinstance(layout, StackedLayout):
        return list(enumerate(layout.layers))
    return [(None, layout)]


def param_layouts(cfg: Qwen2Config) -> dict[tuple, Layout | StackedLayout]:
    """Our flat parameter path (as in nnx.to_flat_state) -> where and how it is stored in a HF checkpoint.
    With cfg.scan_layers a block parameter ("layers", "mlp", "up_kernel") is a StackedLayout of every layer's."""
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    h, kv, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def same(name, shape):
        return Layout(name, shape, shape, tuple(range(len(shape))))

    def transposed(name, hf_shape):
        return Layout(name, hf_shape, hf_shape, (1, 0))

    layouts = {("embed_tokens",): same("model.embed_tokens.weight", (v, d)),
               ("norm", "scale"): same("model.norm.weight", (d,))}
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}.", ("layers", i)
        attn = hf + "self_attn."
        layouts.update({
            ours + ("input_layernorm", "scale"): same(hf + "input_layernorm.weight", (d,)),
            ours + ("post_attention_layernorm", "scale"): same(hf + "post_attention_layernorm.weight", (d,)),
            # q/k/v_proj.weight: [heads * head_dim, D] -> [D, heads, head_dim]
            ours + ("self_attn", "q_kernel"): Layout(attn + "q_proj.weight", (h * dh, d), (h, dh, d), (2, 0, 1)),
            ours + ("self_attn", "k_kernel"): Layout(attn + "k_proj.weight", (kv * dh, d), (kv, dh, d), (2, 0, 1)),
            ours + ("self_attn", "v_kernel"): Layout(attn + "v_proj.weight", (kv * dh, d), (kv, dh, d), (2, 0, 1)),
            ours + ("self_attn", "q_bias"): Layout(attn + "q_proj.bias", (h * dh,), (h, dh), (0, 1)),
            ours + ("self_attn", "k_bias"): Layout(attn + "k_proj.bias", (kv * dh,), (kv, dh), (0, 1)),
            ours + ("self_attn", "v_bias"): Layout(attn + "v_proj.bias", (kv * dh,), (kv, dh), (0, 1)),
            # o_proj.weight: [D, heads * head_dim] -> [heads, head_dim, D]
            ours + ("self_attn", "o_kernel"): Layout(attn + "o_proj.weight", (d, h * dh), (d, h, dh), (1, 2, 0)),
            ours + ("mlp", "gate_kernel"): transposed(hf + "mlp.gate_proj.weight", (f, d)),
            ours + ("mlp", "up_kernel"): transposed(hf + "mlp.up_proj.weight", (f, d)),
            ours + ("mlp", "down_kernel"): transposed(hf + "mlp.down_proj.weight", (d, f)),
        })
    if not cfg.tie_word_embeddings:
        layouts[("lm_head",)] = transposed("lm_head.weight", (v, d))
    if cfg.scan_layers:
        per_layer = [{path[2:]: layouts.pop(path) for path in list(layouts) if path[:2] == ("layers", i)}
                     for i in range(cfg.num_layers)]
        for name in per_layer[0]:
            layouts[("layers", *name)] = StackedLayout(tuple(layer[name] for layer in per_layer))
    return layouts


# --- reading safetensors ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    file: pathlib.Path
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_safetensors_header(path: pathlib.Path) -> dict[str, TensorEntry]:
    """Parse a safetensors file's header: tensor name -> where its bytes are. Errors name the file (and tensor)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise ValueError(f"{path}: not a safetensors file (header length {header_len} exceeds the file)")
        try:
            header = json.loads(fh.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: unreadable safetensors header ({err})") from err
    data_start = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}; supported: {sorted(SAFETENSORS_DTYPES)}")
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        shape = tuple(info["shape"])
        begin, end = (data_start + offset for offset in info["data_offsets"])
        if end - begin != math.prod(shape) * dtype.itemsize or end > size:
            raise ValueError(f"{path}: tensor {name!r} ({info['dtype']}{list(shape)}) has inconsistent data "
                             f"offsets {info['data_offsets']} (file size {size})")
        entries[name] = TensorEntry(path, dtype, shape, begin, end)
    return entries


class SafetensorsCheckpoint:
    """All tensors of a HF checkpoint directory (one or many *.safetensors, with or without the index file)."""

    def __init__(self, directory: str | pathlib.Path):
        self.directory = pathlib.Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"{self.directory}: checkpoint directory does not exist")
        index_path = self.directory / INDEX_FILE
        self.entries: dict[str, TensorEntry] = {}
        if index_path.is_file():
            weight_map = json.loads(index_path.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index_path}: no 'weight_map' object")
            headers = {}
            for name, filename in weight_map.items():
                path = self.directory / filename
                if filename not in headers:
                    if not path.is_file():
                        raise FileNotFoundError(f"{path}: missing (listed in {index_path} for tensor {name!r})")
                    headers[filename] = read_safetensors_header(path)
                if name not in headers[filename]:
                    raise ValueError(f"{path}: tensor {name!r} is not in this file, although {index_path} says so")
                self.entries[name] = headers[filename][name]
        else:
            files = sorted(self.directory.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{self.directory}: no *.safetensors files (and no {INDEX_FILE})")
            for path in files:
                for name, entry in read_safetensors_header(path).items():
                    if name in self.entries:
                        raise ValueError(f"tensor {name!r} appears in both {self.entries[name].file} and {path}")
                    self.entries[name] = entry
        self._maps: dict[pathlib.Path, np.memmap] = {}

    def describe(self, name: str) -> str:
        entry = self.entries.get(name)
        return f"{entry.file}" if entry else f"{self.directory}"

    def array(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view of one tensor; slicing it reads only the bytes of the slice."""
        entry = self.entries[name]
        if entry.file not in self._maps:
            self._maps[entry.file] = np.memmap(entry.file, dtype=np.uint8, mode="r")
        return self._maps[entry.file][entry.begin:entry.end].view(entry.dtype).reshape(entry.shape)


# --- progress -----------------------------------------------------------------------------------------------------


class ByteProgress:
    """`load /ckpt: 3.2/15.2 GB (21%) | 410 MB/s | ETA 29s` every `every_s` seconds and at the end, on process 0.

    Quiet below `min_bytes` so tiny test checkpoints print nothing.
    """

    def __init__(self, label: str, total_bytes: int, *, every_s: float = 10.0, min_bytes: int = 256 * 2**20,
                 stream=None):
        self.label, self.total, self.every_s = label, total_bytes, every_s
        self.enabled = total_bytes >= min_bytes and jax.process_index() == 0
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = self.last = time.monotonic()

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.monotonic()
        if self.enabled and (now - self.last >= self.every_s or self.done >= self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            print(f"{self.label}: {self.done / 1e9:.1f}/{self.total / 1e9:.1f} GB "
                  f"({100 * self.done / self.total:.0f}%) | {rate / 1e6:.0f} MB/s | ETA {eta:.0f}s",
                  file=self.stream, flush=True)


# --- import -------------------------------------------------------------------------------------------------------


def load_hf_checkpoint(directory: str | pathlib.Path, *, mesh: jax.sharding.Mesh | None = None,
                       rules: sharding.Rules | None = None, dtype="float32", param_dtype="float32",
                       **config_overrides) -> tuple[Qwen2Config, Qwen2ForCausalLM]:
    """Build a Qwen2ForCausalLM from a local HF checkpoint, each tensor placed directly on its target sharding.

    mesh=None puts every parameter on the first device. config_overrides (e.g. remat=True) go to Qwen2Config.
    Raises FileNotFoundError / ValueError naming the file and tensor when the checkpoint does not fit the config.
    """
    directory = pathlib.Path(directory)
    cfg = Qwen2Config.from_hf(directory, dtype=dtype, param_dtype=param_dtype, **config_overrides)
    checkpoint = SafetensorsCheckpoint(directory)
    layouts = param_layouts(cfg)

    abstract = nnx.eval_shape(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    if mesh is not None:
        targets = sharding.state_shardings(abstract_state, mesh, rules)
    else:
        single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        targets = jax.tree.map(lambda v: v.replace(single), abstract_state,
                               is_leaf=lambda x: isinstance(x, nnx.Variable))

    flat_targets = dict(nnx.to_flat_state(targets))
    if set(flat_targets) != set(layouts):  # a bug in this module, never the user's checkpoint
        raise AssertionError(f"layout map and model disagree: {set(flat_targets) ^ set(layouts)}")
    _check_tensor_names(checkpoint, cfg, {t.hf_name for layout in layouts.values() for _, t in hf_tensors(layout)})

    def nbytes(layout):
        return sum(checkpoint.entries[t.hf_name].nbytes for _, t in hf_tensors(layout))

    progress = ByteProgress(f"load {directory}", sum(nbytes(layouts[p]) for p in flat_targets))
    loaded = []
    for path, target in flat_targets.items():
        layout = layouts[path]
        loaded.append((path, target.replace(_read_sharded(checkpoint, layout, target.get_value(), cfg.param_dtype))))
        progress.advance(nbytes(layout))
    model = nnx.merge(graphdef, nnx.from_flat_state(loaded))
    return cfg, model


def _check_tensor_names(checkpoint: SafetensorsCheckpoint, cfg: Qwen2Config, expected: set[str]) -> None:
    present = set(checkpoint.entries)
    missing = sorted(expected - present)
    if missing:
        raise ValueError(f"{checkpoint.directory}: missing tensor {missing[0]!r}"
                         + (f" (and {len(missing) - 1} more: {missing[1:4]}...)" if len(missing) > 1 else "")
                         + f" required by its config.json ({cfg.num_layers} layers, "
                         f"tie_word_embeddings={cfg.tie_word_embeddings})")
    tolerated = {"lm_head.weight"} if cfg.tie_word_embeddings else set()  # tied: transformers ignores it too
    unexpected = sorted(name for name in present - expected - tolerated if not name.endswith(IGNORED_SUFFIXES))
    if unexpected:
        name = unexpected[0]
        raise ValueError(f"{checkpoint.describe(name)}: unexpected tensor {name!r}"
                         + (f" (and {len(unexpected) - 1} more: {unexpected[1:4]}...)" if len(unexpected) > 1 else "")
                         + f" that a Qwen2 model with this config.json ({cfg.num_layers} layers, "
                         f"tie_word_embeddings={cfg.tie_word_embeddings}) does not have")


def _read_sharded(checkpoint: SafetensorsCheckpoint, layout: Layout | StackedLayout,
                  sharding_: jax.sharding.Sharding, param_dtype: np.dtype) -> jax.Array:
    views = []
    for _, tensor in hf_tensors(layout):
        entry = checkpoint.entries[tensor.hf_name]
        if entry.shape != tensor.hf_shape:
            raise ValueError(f"{entry.file}: tensor {tensor.hf_name!r} has shape {list(entry.shape)} but "
                             f"config.json implies {list(tensor.hf_shape)}")
        views.append(tensor.to_ours(checkpoint.array(tensor.hf_name)))

    def read_slice(index):
        if isinstance(layout, Layout):
            return np.asarray(views[0][index], dtype=param_dtype)
        layers, rest = index[0], tuple(index[1:])  # a stacked shard: its layers' slices, one read each
        return np.stack([np.asarray(views[i][rest], dtype=param_dtype) for i in range(len(views))[layers]])

    return jax.make_array_from_callback(layout.shape, sharding_, read_slice)


# --- export -------------------------------------------------------------------------------------------------------


def _to_host(array: jax.Array) -> np.ndarray:
    """One parameter, gathered to this host (all processes must call this together on a pod)."""
    if array.is_fully_addressable:
        return np.asarray(jax.device_get(array))
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def _shard_groups(items: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    groups, current, current_bytes = [], [], 0
    for name, nbytes in items:
        if current and current_bytes + nbytes > max_shard_bytes:
            groups.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += nbytes
    if current:
        groups.append(current)
    return groups


def _safetensors_header(tensors: list[tuple[str, tuple[int, ...], np.dtype]]) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in tensors:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keeps the data section 8-byte aligned
    return struct.pack("<Q", len(encoded)) + encoded


def export_hf_checkpoint(model: Qwen2ForCausalLM, cfg: Qwen2Config, out_dir: str | pathlib.Path, *,
                         dtype: str | np.dtype | None = None, max_shard_bytes: int = 5 * 2**30) -> pathlib.Path:
    """Write config.json + safetensors that transformers loads as Qwen2ForCausalLM; no torch needed.

    dtype: tensor dtype on disk (default cfg.param_dtype; "bfloat16" halves the size for serving).
    Tensors are gathered and written one at a time; on a pod every process calls this and process 0 writes.
    """
    out_dir = pathlib.Path(out_dir)
    dtype = np.dtype(cfg.param_dtype if dtype is None else jnp.dtype(dtype))
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"export_hf_checkpoint: dtype {dtype} cannot be written; use one of {sorted(map(str, DTYPE_NAMES))}")
    layouts = param_layouts(cfg)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    if set(flat) != set(layouts):
        raise ValueError(f"export_hf_checkpoint: the model's parameters do not match cfg "
                         f"(differing: {sorted(map(str, set(flat) ^ set(layouts)))[:4]})")
    for path, layout in layouts.items():
        if tuple(flat[path].shape) != layout.shape:
            raise ValueError(f"export_hf_checkpoint: parameter {'.'.join(map(str, path))} has shape "
                             f"{tuple(flat[path].shape)}, cfg implies {layout.shape}")

    tensors = _hf_tensor_sources(layouts)
    order = sorted(tensors, key=_hf_sort_key)
    sizes = [(name, math.prod(tensors[name][2].hf_shape) * dtype.itemsize) for name in order]
    groups = _shard_groups(sizes, max_shard_bytes)
    filenames = (["model.safetensors"] if len(groups) == 1 else
                 [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    writer = jax.process_index() == 0
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
        config = cfg.to_hf_dict() | {"dtype": str(dtype)}
        (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    progress = ByteProgress(f"export {out_dir}", sum(n for _, n in sizes))
    for filename, names in zip(filenames, groups):
        header = _safetensors_header([(n, tensors[n][2].hf_shape, dtype) for n in names])
        fh = open(out_dir / filename, "wb") if writer else None
        try:
            if fh:
                fh.write(header)
            for name in names:
                path, layer, tensor = tensors[name]
                value = flat[path].get_value()
                host = tensor.to_hf(_to_host(value if layer is None else value[layer]))
                if fh:
                    fh.write(np.ascontiguousarray(host.astype(dtype)).view(np.uint8).data)  # bf16 has no buffer format
                progress.advance(host.size * dtype.itemsize)
        finally:
            if fh:
                fh.close()
    if writer and len(groups) > 1:
        index = {"metadata": {"total_size": sum(n for _, n in sizes)},
                 "weight_map": {name: filename for filename, names in zip(filenames, groups) for name in names}}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return out_dir


def _hf_sort_key(name: str) -> tuple:
    """embed, layers in numeric order, final norm, lm_head (the order transformers writes)."""
    parts = name.split(".")
    if parts[:2] == ["model", "layers"]:
        return (1, int(parts[2]), ".".join(parts[3:]))
    return (0 if "embed_tokens" in name else 2 if parts[:2] == ["model", "norm"] else 3, 0, name)


def _hf_tensor_sources(layouts) -> dict[str, tuple[tuple, int | None, Layout]]:
    """HF tensor name -> (our parameter path, layer index within a stacked parameter or None, its Layout)."""
    return {tensor.hf_name: (path, layer, tensor)
            for path, layout in layouts.items() for layer, tensor in hf_tensors(layout)}
