"""The jitted device side of a training step: per-token log-probs (old policy, reference) and one optimizer
update over a mini-batch with gradient accumulation and a non-finite guard.

Everything here runs under `jax.jit` with explicit shardings on the trainer's mesh: parameters and optimizer
state keep the shardings they were created with, token arrays split their batch dimension by the "batch" rule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from tspo_jax import sharding
from tspo_jax.algorithms.loss import LossConfig, policy_loss
from tspo_jax.models.logprobs import token_log_probs

# Inputs of one mini-batch update, each [M micro-batches, micro, T] (old_logp not with on_policy=True).
UPDATE_FIELDS = ("tokens", "positions", "attention_mask", "loss_mask", "advantages", "old_logp")
# Metrics that add up over micro-batches (the loss is given global token / sequence counts).
_ADDITIVE = ("policy_loss", "kl", "entropy", "clip_fraction", "dual_clip_fraction", "ppo_kl", "ratio_mean")


@dataclasses.dataclass(frozen=True)
class UpdateResult:
    metrics: dict[str, float]
    applied: bool  # False: the loss or gradient was not finite and nothing changed


def batch_shards(mesh: jax.sharding.Mesh, rules) -> int:
    """How many devices share the batch dimension (rows must be a multiple of it)."""
    spec = sharding.logical_to_spec(("batch",), sharding.normalize_rules(rules, mesh))[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
    return int(np.prod([mesh.shape[a] for a in axes]))


class PolicyUpdate:
    """Jitted log-probs and updates for one model structure on one mesh.

    graphdef: nnx graph of the policy; params: its nnx.State (already on the mesh).
    micro_batch_size: rows per forward/backward pass and process (log-probs are computed in chunks of this size
    too); the processes' rows together (`processes`, default jax.process_count()) form the global micro-batch.
    """

    def __init__(self, graphdef, params: nnx.State, *, optimizer: optax.GradientTransformation,
                 schedule: optax.Schedule, loss_config: LossConfig, mesh: jax.sharding.Mesh, rules,
                 micro_batch_size: int, logprob_chunk_size: int = 512, processes: int | None = None):
        shards = batch_shards(mesh, rules)
        processes = jax.process_count() if processes is None else processes
        if micro_batch_size * processes % shards:
            raise ValueError(f"micro-batches of {micro_batch_size} trajectories per process x {processes} "
                             f"process(es) cannot be split over the {shards} devices of the mesh's batch axes; "
                             "make UpdateSpec.micro_batch_size a multiple of the devices per process")
        self.graphdef = graphdef
        self.optimizer = optimizer
        self.schedule = schedule
        self.loss_config = loss_config
        self.micro_batch_size = micro_batch_size
        self.logprob_chunk_size = logprob_chunk_size
        self.uses_reference = loss_config.kl != "none"
        self.param_shardings = jax.tree.map(lambda x: x.sharding, params)
        rows = sharding.named_sharding(mesh, ("batch", "length"), rules)
        stacked = NamedSharding(mesh, PartitionSpec(None, *rows.spec))
        replicated = NamedSharding(mesh, PartitionSpec())
        self.row_sharding, self.stacked_sharding = rows, stacked

        abstract_opt = jax.eval_shape(optimizer.init, params)
        # Optimizer moments live where their parameters live; counters are replicated.
        self.opt_shardings = _moment_shardings(abstract_opt, params, self.param_shardings, replicated)
        self._init_opt = jax.jit(optimizer.init, in_shardings=(self.param_shardings,), out_shardings=self.opt_shardings)

        self._log_probs = sharding.sharded_jit(
            self._log_probs_fn, mesh, rules,
            in_shardings=(self.param_shardings, rows, rows, rows), out_shardings=(rows, rows))
        self._update = {
            on_policy: sharding.sharded_jit(
                self._update_fn, mesh, rules,
                in_shardings=(self.param_shardings, self.opt_shardings,
                              {f: stacked for f in self.update_fields(on_policy)}),
                out_shardings=(self.param_shardings, self.opt_shardings, replicated),
                donate_argnums=(0, 1))
            for on_policy in (False, True)}  # each compiles on first use only

    @property
    def fields(self) -> tuple[str, ...]:
        """The [rows, T] arrays one update reads."""
        return UPDATE_FIELDS + (("ref_logp",) if self.uses_reference else ())

    # ----- optimizer state ---------------------------------------------------------------------------------
    def init_optimizer(self, params: nnx.State):
        return self._init_opt(params)

    def abstract_optimizer_state(self, params: nnx.State):
        """init_optimizer(params)'s shapes, dtypes and shardings (ShapeDtypeStructs), without a device."""
        opt = jax.eval_shape(self.optimizer.init, params)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt, self.opt_shardings)

    # ----- lowering for abstract inputs (tspo_jax.fit_check) ----------------------------------------------
    def lower_log_probs(self, params: nnx.State, rows: int, length: int) -> jax.stages.Lowered:
        """The log-prob pass over one call's `rows` global rows of `length` tokens, for abstract `params`."""
        token = jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=self.row_sharding)
        mask = jax.ShapeDtypeStruct((rows, length), jnp.bool_, sharding=self.row_sharding)
        return self._log_probs.lower(params, token, token, mask)

    def lower_update(self, params: nnx.State, micro_batches: int, rows: int, length: int, *,
                     on_policy: bool = False) -> jax.stages.Lowered:
        """One mini-batch update of `micro_batches` micro-batches, each `rows` global rows of `length` tokens."""
        dtypes = {"tokens": jnp.int32, "positions": jnp.int32, "attention_mask": jnp.bool_, "loss_mask": jnp.int32,
                  "advantages": jnp.float32, "old_logp": jnp.float32, "ref_logp": jnp.float32}
        minibatch = {f: jax.ShapeDtypeStruct((micro_batches, rows, length), dtypes[f], sharding=self.stacked_sharding)
                     for f in self.update_fields(on_policy)}
        return self._update[on_policy].lower(params, self.abstract_optimizer_state(params), minibatch)

    # ----- log-probs ---------------------------------------------------------------------------------------
    def _log_probs_fn(self, params, tokens, positions, attention_mask):
        model = nnx.merge(self.graphdef, params)
        return token_log_probs(model, tokens, positions, attention_mask, chunk_size=self.logprob_chunk_size)

    def log_probs(self, params: nnx.State, tokens: np.ndarray, positions: np.ndarray,
                  attention_mask: np.ndarray) -> np.ndarray:
        """logp f32[B, T] (host) of `tokens` under `params`, computed `micro_batch_size` rows at a time.

        Rows are this process's; on a pod the processes' rows together form the global micro-batch."""
        out = []
        for start in range(0, tokens.shape[0], self.micro_batch_size):
            rows = slice(start, start + self.micro_batch_size)
            inputs = [self._global(x[rows], self.row_sharding) for x in (tokens, positions, attention_mask)]
            logp, _ = self._log_probs(params, *inputs)
            out.append(self._local(logp, self.row_sharding))
        return np.concatenate(out)

    def _global(self, local: np.ndarray, sharding: NamedSharding) -> jax.Array:
        """This process's rows -> the global array (identical to device_put with one process)."""
        return multihost_utils.host_local_array_to_global_array(local, sharding.mesh, sharding.spec)

    def _local(self, array: jax.Array, sharding: NamedSharding) -> np.ndarray:
        return np.asarray(multihost_utils.global_array_to_host_local_array(array, sharding.mesh, sharding.spec))

    # ----- update ------------------------------------------------------------------------------------------
    def update_fields(self, on_policy: bool) -> tuple[str, ...]:
        """`fields`, less old_logp for an on-policy update (which takes its own log-probs as the old ones)."""
        return tuple(f for f in self.fields if not (on_policy and f == "old_logp"))

    def _micro_loss(self, params, micro, num_tokens, num_sequences):
        model = nnx.merge(self.graphdef, params)
        logp, entropy = token_log_probs(model, micro["tokens"], micro["positions"], micro["attention_mask"],
                                        chunk_size=self.logprob_chunk_size)
        # on_policy: the params are those that sampled, so the old log-probs are these very numbers (ratio
        # exactly 1); the stop-gradient keeps the ratio's gradient that of exp(logp - old_logp).
        old_logp = micro["old_logp"] if "old_logp" in micro else jax.lax.stop_gradient(logp)
        return policy_loss(
            logp, old_logp, micro.get("ref_logp"), micro["advantages"], micro["loss_mask"], entropy,
            config=self.loss_config, num_global_tokens=num_tokens, num_global_sequences=num_sequences)

    def _update_fn(self, params, opt_state, minibatch):
        mask = minibatch["loss_mask"].astype(bool)
        num_tokens = jnp.maximum(mask.sum(), 1).astype(jnp.float32)
        num_sequences = jnp.maximum((mask.sum(axis=-1) > 0).sum(), 1).astype(jnp.float32)
        grad_fn = jax.value_and_grad(self._micro_loss, has_aux=True)

        def accumulate(carry, micro):
            grads, loss, metrics = carry
            (micro_loss, micro_metrics), micro_grads = grad_fn(params, micro, num_tokens, num_sequences)
            # Each weight's gradient lands on its parameter's FSDP shard: XLA then reduce-scatters it instead of
            # all-reducing the full tensor to every device (a 2 GiB fp32 LM head gradient on 7B).
            micro_grads = jax.lax.with_sharding_constraint(micro_grads, self.param_shardings)
            grads = jax.tree.map(jnp.add, grads, micro_grads)
            metrics = {
                name: (jnp.minimum(metrics[name], value) if name == "ratio_min" else
                       jnp.maximum(metrics[name], value) if name == "ratio_max" else metrics[name] + value)
                for name, value in micro_metrics.items()
            }
            return (grads, loss + micro_loss, metrics), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        first = jax.tree.map(lambda x: x[0], minibatch)
        metric_shapes = jax.eval_shape(lambda: grad_fn(params, first, num_tokens, num_sequences)[0][1])
        init_metrics = {name: jnp.full((), jnp.inf if name == "ratio_min" else -jnp.inf if name == "ratio_max"
                                       else 0.0, jnp.float32) for name in metric_shapes}
        (grads, loss, metrics), _ = jax.lax.scan(accumulate, (zeros, jnp.float32(0.0), init_metrics), minibatch)

        grad_norm = optax.tree.norm(grads)
        applied = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        learning_rate = self.schedule(_update_count(opt_state))
        updates, new_opt_state = self.optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        # A non-finite loss or gradient leaves parameters and optimizer state exactly as they were.
        keep = lambda new, old: jnp.where(applied, new, old)  # noqa: E731
        params = jax.tree.map(keep, new_params, params)
        opt_state = jax.tree.map(keep, new_opt_state, opt_state)
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, learning_rate=learning_rate,
                       applied=applied.astype(jnp.float32), tokens=num_tokens)
        return params, opt_state, metrics

    def stack_micro_batches(self, arrays: Mapping[str, np.ndarray], *, on_policy: bool = False
                            ) -> dict[str, np.ndarray]:
        """[rows, T] -> [rows / micro, micro, T] for every field the update reads."""
        fields = self.update_fields(on_policy)
        missing = [f for f in fields if f not in arrays]
        if missing:
            raise KeyError(f"the update needs {missing}" + (" (old_logp may be left out only with on_policy=True)"
                                                            if "old_logp" in missing else ""))
        rows = arrays["tokens"].shape[0]
        if rows % self.micro_batch_size:
            raise ValueError(f"a mini-batch of {rows} rows is not a multiple of micro_batch_size={self.micro_batch_size}")
        return {f: np.asarray(arrays[f]).reshape(rows // self.micro_batch_size, self.micro_batch_size, -1)
                for f in fields}

    def update(self, params, opt_state, arrays: Mapping[str, np.ndarray], *, on_policy: bool = False):
        """One optimizer update from a mini-batch of [rows, T] arrays; params and opt_state are donated.

        on_policy: `params` are the very params that sampled the rows (the step's only update), so no old_logp
        is needed: the old log-probs are the update's own, under a stop-gradient, and the ratio is exactly 1.
        Returns (params, opt_state, UpdateResult)."""
        minibatch = {name: self._global(value, self.stacked_sharding)
                     for name, value in self.stack_micro_batches(arrays, on_policy=on_policy).items()}
        params, opt_state, metrics = self._update[on_policy](params, opt_state, minibatch)
        metrics = {name: float(value) for name, value in jax.device_get(metrics).items()}
        return params, opt_state, UpdateResult(metrics=metrics, applied=bool(metrics.pop("applied")))


class SupervisedUpdate(PolicyUpdate):
    """The SFT step on the same machinery (shardings, micro-batch accumulation, non-finite guard, optimizer):
    next-token cross-entropy on the policy's own tokens, `-Σ loss_mask·log p / Σ loss_mask` over the whole
    mini-batch (SPEC §9); prompt and observation tokens (loss_mask 0) get no gradient."""

    SFT_FIELDS = ("tokens", "positions", "attention_mask", "loss_mask")

    def __init__(self, graphdef, params: nnx.State, **kwargs):
        super().__init__(graphdef, params, loss_config=LossConfig(kl="none"), **kwargs)

    @property
    def fields(self) -> tuple[str, ...]:
        return self.SFT_FIELDS

    def _micro_loss(self, params, micro, num_tokens, num_sequences):
        model = nnx.merge(self.graphdef, params)
        logp, entropy = token_log_probs(model, micro["tokens"], micro["positions"], micro["attention_mask"],
                                        chunk_size=self.logprob_chunk_size)
        mask = micro["loss_mask"].astype(jnp.float32)
        nll = -jnp.sum(jnp.where(mask > 0, logp, 0.0)) / num_tokens
        return nll, {"nll": nll, "entropy": jnp.sum(jnp.where(mask > 0, entropy, 0.0)) / num_tokens}


def _update_count(opt_state) -> jax.Array:
    """Applied updates so far: the count of optax's schedule state (the learning rate's step)."""
    counts = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state)
              if any(getattr(k, "name", None) == "count" for k in path)]
    return counts[-1] if counts else jnp.zeros((), jnp.int32)


def _moment_shardings(abstract_opt, params, param_shardings, replicated):
    """Shardings for the optimizer state: any sub-tree shaped like the params (Adam's mu, nu) takes the params'
    shardings; everything else (counters) is replicated."""
    param_structure = jax.tree.structure(params)
    param_leaves = jax.tree.leaves(param_shardings)

    def assign(subtree):
        if jax.tree.structure(subtree) == param_structure:
            return jax.tree.unflatten(param_structure, param_leaves)
        return None

    def walk(node):
        found = assign(node)
        if found is not None:
            return found
        if isinstance(node, jax.ShapeDtypeStruct):
            return replicated
        children, treedef = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
        return jax.tree_util.tree_unflatten(treedef, [walk(child) for child in children])

    return walk(abstract_opt)
