"""The policy model of a run: where its weights come from, its tokenizer and config, and the mesh and shardings
it lives on. Shared by every entry point that holds a model: the RL trainer, SFT, evaluation and the fit check.

`open_policy` reads only config files and the tokenizer (no weights), so a run can build its jitted functions
from the abstract model first; `PolicyModel.load` then reads the weights straight onto their shards.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib

import jax
import jax.numpy as jnp
from flax import nnx

from tspo_jax import run_files, sharding
from tspo_jax.models.hf_io import load_hf_checkpoint
from tspo_jax.models.qwen2 import PRESETS, Qwen2Config, Qwen2ForCausalLM
from tspo_jax.rollout.tokenizer import load_tokenizer
from tspo_jax.training import bootstrap, multihost
from tspo_jax.training.errors import StartupError

log = logging.getLogger("tspo_jax.train")


@dataclasses.dataclass
class PolicyModel:
    """A Qwen2 policy's structure on a mesh, without weights.

    model_dir: the HF directory the weights come from (None: shapes only, `policy_from_config`).
    tokenizer: its tokenizer (None with shapes only). cfg: its Qwen2Config (with the run's dtypes and remat).
    abstract_model: the nnx model from `nnx.eval_shape`; graphdef / abstract_params: its split, each param a
    ShapeDtypeStruct carrying its NamedSharding on `mesh` under `rules`.
    """

    model_dir: pathlib.Path | None
    tokenizer: object | None
    cfg: Qwen2Config
    mesh: jax.sharding.Mesh
    rules: dict
    abstract_model: Qwen2ForCausalLM
    graphdef: nnx.GraphDef
    abstract_params: nnx.State
    dtype: str
    param_dtype: str

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def load(self, model_dir: pathlib.Path | None = None, *, param_dtype: str | None = None) -> Qwen2ForCausalLM:
        """The model with the weights of `model_dir` (default: the policy's), each tensor read onto its shard,
        stored in `param_dtype` (default: the policy's)."""
        try:
            _, model = load_hf_checkpoint(model_dir or self.model_dir, mesh=self.mesh, rules=self.rules,
                                          dtype=self.dtype, param_dtype=param_dtype or self.param_dtype,
                                          remat=self.cfg.remat, scan_layers=self.cfg.scan_layers,
                                          attention=self.cfg.attention)
        except (OSError, ValueError) as error:
            raise StartupError(f"ModelSpec.checkpoint: {error}") from None
        return model

    def load_reference(self) -> Qwen2ForCausalLM:
        """The frozen reference model, held in the compute dtype: it is never updated, and its forward casts
        every weight to that dtype anyway, so its log-probs are the same as from fp32 copies at half the bytes."""
        return self.load(param_dtype=self.dtype)

    def abstract_state(self, dtype: str | None = None) -> nnx.State:
        """abstract_params, or the same tree stored in `dtype` (e.g. the reference's compute dtype)."""
        if dtype is None:
            return self.abstract_params
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.dtype(dtype), sharding=a.sharding),
                            self.abstract_params)


def make_mesh(mesh_spec, devices=None) -> tuple[jax.sharding.Mesh, dict]:
    """The run's device mesh and normalized logical-axis rules (MeshSpec), over `devices` (default: all of
    jax.devices(); the fit check passes a TPU topology's compile-only devices)."""
    devices = jax.devices() if devices is None else list(devices)
    devices = devices[: mesh_spec.num_devices] if mesh_spec.num_devices else devices
    mesh = sharding.make_mesh(mesh_spec.data, mesh_spec.fsdp, mesh_spec.tensor, devices=devices)
    return mesh, sharding.normalize_rules(mesh_spec.rules or None, mesh)


def open_policy(spec, model_dir: str | pathlib.Path, mesh: jax.sharding.Mesh, rules) -> PolicyModel:
    """ModelSpec `spec` over the HF directory `model_dir`: tokenizer, config and abstract sharded params."""
    model_dir = pathlib.Path(model_dir)
    try:
        tokenizer = load_tokenizer(spec.tokenizer or model_dir)
        cfg = Qwen2Config.from_hf(model_dir, dtype=spec.dtype, param_dtype=spec.param_dtype, remat=spec.remat)
    except (OSError, ValueError) as error:
        raise StartupError(f"ModelSpec.checkpoint / tokenizer: {error}") from None
    if spec.expect_preset is not None:
        expected = PRESETS[spec.expect_preset]
        fields = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")
        wrong = {f: (getattr(cfg, f), getattr(expected, f)) for f in fields if getattr(cfg, f) != getattr(expected, f)}
        if wrong:
            raise StartupError(f"{model_dir}/config.json is not a Qwen2.5-{spec.expect_preset} "
                               f"(ModelSpec.expect_preset): (found, expected) {wrong}")
    return policy_from_config(spec, cfg, mesh, rules, model_dir=model_dir, tokenizer=tokenizer)


def policy_from_config(spec, cfg: Qwen2Config, mesh: jax.sharding.Mesh, rules, *,
                       model_dir: pathlib.Path | None = None, tokenizer=None) -> PolicyModel:
    """The PolicyModel of a Qwen2Config's shapes (ModelSpec `spec` gives dtypes and remat) on `mesh`: no files
    are read, so it works from a preset or a config.json alone (the fit check)."""
    cfg = cfg.replace(dtype=spec.dtype, param_dtype=spec.param_dtype, remat=spec.remat, scan_layers=spec.scan_layers,
                      attention=spec.attention)
    abstract_model = nnx.eval_shape(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract_model)
    shardings = sharding.state_shardings(abstract_state, mesh, rules)
    abstract_params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                   abstract_state, shardings)
    return PolicyModel(model_dir=model_dir, tokenizer=tokenizer, cfg=cfg, mesh=mesh, rules=rules,
                       abstract_model=abstract_model, graphdef=graphdef, abstract_params=abstract_params,
                       dtype=spec.dtype, param_dtype=spec.param_dtype)


def tiny_model_dir(spec, *, run_dir, local_dir: pathlib.Path, texts: list[str], seed: int) -> pathlib.Path:
    """The run's own tiny random-init model (ModelSpec.checkpoint = None), made once in local_dir/tiny_model.

    texts: what its tokenizer learns from.
    With a gs:// RUN_DIR the model is published there, so every host and any restart uses the same weights.
    """
    local, published = local_dir / "tiny_model", run_dir / "tiny_model"
    remote = run_files.is_remote(run_dir)
    with multihost.process_zero_first("tiny model"):
        if remote:
            bootstrap.fetch(published, local)  # the run's own initial weights, wherever it restarts
        model_dir = bootstrap.tiny_checkpoint(local, preset=spec.tiny_preset, texts=texts, seed=seed)
        if remote and jax.process_index() == 0:
            bootstrap.publish(local, published)
    return model_dir


def run_model_dir(run_dir, spec, scratch: pathlib.Path) -> pathlib.Path:
    """The HF directory (config, tokenizer, initial weights) run `run_dir` (an epath, local or gs://) started from:
    ModelSpec `spec`.checkpoint, or the tiny model the run made for itself, fetched into `scratch` from a gs://
    RUN_DIR. Its tokenizer is `spec.tokenizer or` this directory."""
    if spec.checkpoint:
        return pathlib.Path(spec.checkpoint)
    if not run_files.is_remote(run_dir):
        return pathlib.Path(os.fspath(run_dir)) / "tiny_model"
    model_dir = scratch / "tiny_model"
    if not bootstrap.fetch(run_dir / "tiny_model", model_dir):
        raise FileNotFoundError(f"{run_dir / 'tiny_model'} holds no complete tiny model")
    return model_dir
