"""Device mesh and logical-axis sharding for the policy, the reference model and their activations.

Every parameter carries `logical_axes` metadata (e.g. `("embed", "q_heads", "head_dim")`); every activation the
model constrains names its axes the same way (`("batch", "length", "act_embed")`). A rules table maps each logical
name to mesh axes. Rules are plain data (a tuple of pairs or a dict) so a gin file can override them through the
trainer, e.g. `(("kv_heads", None),)` on a model with fewer KV heads than the tensor axis.

    mesh = make_mesh(data=1, fsdp=-1, tensor=1)
    model = create_sharded_model(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)), mesh, rules)
    step = sharded_jit(fn, mesh, rules, in_shardings=..., out_shardings=...)

Nothing here falls back silently: an unknown logical name, an unknown mesh axis, or a dimension that the mesh cannot
divide is an error naming the parameter (or activation) and the rule.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Union

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = Union[None, str, tuple[str, ...]]
Rules = Union[Mapping[str, MeshAxes], Sequence[tuple[str, MeshAxes]]]

# Parameters: FSDP shards the model dimension, tensor parallelism the heads / MLP / vocabulary dimension.
# Activations: the batch is split over data and fsdp; the heads / MLP / vocabulary dimensions follow the weights.
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    # parameter axes
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    # activation axes
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_q_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # KV cache axes ([layers, batch, cache_length, kv_heads, head_dim])
    ("layers", None),
    ("cache_length", None),
)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes ("data", "fsdp", "tensor"); one size may be -1 (= all remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"make_mesh: at most one axis may be -1, got {sizes}")
    for name, size in sizes.items():
        if size != -1 and size < 1:
            raise ValueError(f"make_mesh: axis {name!r} has size {size}; sizes must be >= 1 or -1")
    known = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if len(devices) % known:
            raise ValueError(f"make_mesh: {len(devices)} devices cannot be split into {sizes}")
        sizes[free[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(
            f"make_mesh: data*fsdp*tensor = {math.prod(sizes.values())} ({sizes}) but there are {len(devices)} devices"
        )
    shape = tuple(sizes[name] for name in MESH_AXES)
    try:
        # Places the fastest-interconnect devices on the last (tensor) axis on TPU.
        device_array = mesh_utils.create_device_mesh(shape, devices=devices)
    except (AssertionError, NotImplementedError, ValueError):
        device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES)


def normalize_rules(rules: Rules | None, mesh: Mesh | None = None) -> dict[str, MeshAxes]:
    """DEFAULT_RULES updated by `rules` (dict or pairs), checked against the mesh's axis names."""
    merged: dict[str, MeshAxes] = dict(DEFAULT_RULES)
    if rules is not None:
        pairs = rules.items() if isinstance(rules, Mapping) else rules
        for pair in pairs:
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str)):
                raise ValueError(f"sharding rule {pair!r} is not a (logical_axis, mesh_axes) pair")
            name, axes = pair
            merged[name] = tuple(axes) if isinstance(axes, list) else axes
    axis_names = MESH_AXES if mesh is None else mesh.axis_names
    for name, axes in merged.items():
        for axis in _as_tuple(axes):
            if axis not in axis_names:
                raise ValueError(
                    f"sharding rule ({name!r}, {axes!r}) names mesh axis {axis!r}; the mesh has {axis_names}"
                )
    return merged


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(logical_axes: Iterable[str | None], rules: Mapping[str, MeshAxes], *, what: str = "") -> PartitionSpec:
    """PartitionSpec for an array whose dimensions have the given logical names (None = replicated)."""
    spec, used = [], set()
    for name in logical_axes:
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ValueError(f"{what or 'array'}: logical axis {name!r} has no sharding rule (rules: {sorted(rules)})")
        axes = _as_tuple(rules[name])
        clash = used.intersection(axes)
        if clash:
            raise ValueError(f"{what or 'array'}: mesh axes {sorted(clash)} used by two dimensions of {tuple(logical_axes)}")
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def _check_divisible(shape: Sequence[int], spec: PartitionSpec, mesh: Mesh, logical_axes, what: str) -> None:
    for dim, (size, axes) in enumerate(zip(shape, spec)):
        parts = math.prod(mesh.shape[a] for a in _as_tuple(axes))
        if size % parts:
            raise ValueError(
                f"{what}: dimension {dim} ({logical_axes[dim]!r}, size {size}) cannot be split over mesh axes "
                f"{axes!r} ({parts} devices); override the rule, e.g. ({logical_axes[dim]!r}, None)"
            )


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None], rules: Rules | None = None, *,
                   shape: Sequence[int] | None = None, what: str = "") -> NamedSharding:
    """NamedSharding on `mesh` for an array with the given logical axes; checks divisibility when shape is given."""
    rules = normalize_rules(rules, mesh)
    spec = logical_to_spec(logical_axes, rules, what=what)
    if shape is not None:
        _check_divisible(shape, spec, mesh, tuple(logical_axes), what or "array")
    return NamedSharding(mesh, spec)


def _path_name(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules | None = None) -> nnx.State:
    """For a (possibly abstract) model state, the same tree with each Variable's value replaced by its NamedSharding.

    Every parameter must carry `logical_axes` metadata of the right length.
    """
    rules = normalize_rules(rules, mesh)

    def one(path, var):
        what = f"parameter {_path_name(path)}"
        axes = var.get_metadata().get("logical_axes")
        if axes is None:
            raise ValueError(f"{what} has no logical_axes metadata, so it cannot be sharded by rules")
        if len(axes) != len(var.shape):
            raise ValueError(f"{what}: logical_axes {axes} do not match its shape {var.shape}")
        return var.replace(named_sharding(mesh, axes, rules, shape=var.shape, what=what))

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded_model(make_model: Callable[[], nnx.Module], mesh: Mesh, rules: Rules | None = None) -> nnx.Module:
    """Build `make_model()` with every parameter created directly in its shard (no full copy on one device)."""
    abstract = nnx.eval_shape(make_model)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)

    def init():
        return nnx.state(make_model())

    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


# --- activation constraints -----------------------------------------------------------------------------------

_ACTIVE: contextvars.ContextVar[tuple[Mesh, dict[str, MeshAxes]] | None] = contextvars.ContextVar(
    "tspo_jax_sharding_rules", default=None
)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: Rules | None = None):
    """While tracing inside this context, `constrain` pins activations to their rule-given shardings."""
    token = _ACTIVE.set((mesh, normalize_rules(rules, mesh)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_rules() -> tuple[Mesh, dict[str, MeshAxes]] | None:
    """(mesh, rules) of the enclosing `activation_rules` (None outside one: a single device)."""
    return _ACTIVE.get()


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical axis names; the identity outside `activation_rules` (one device)."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical_axes, rules)))


def sharded_jit(fn: Callable, mesh: Mesh, rules: Rules | None = None, *, in_shardings: Any, out_shardings: Any,
                donate_argnums: int | Sequence[int] = (), static_argnums: int | Sequence[int] = ()) -> Callable:
    """`jax.jit` with explicit in/out shardings whose trace always sees the activation rules.

    The rules are entered inside the traced function (not around the call), so a cached trace can never have been
    made without them.
    """
    rules = normalize_rules(rules, mesh)

    def traced(*args, **kwargs):
        with activation_rules(mesh, rules):
            return fn(*args, **kwargs)

    return jax.jit(traced, in_shardings=in_shardings, out_shardings=out_shardings,
                   donate_argnums=donate_argnums, static_argnums=static_argnums)
