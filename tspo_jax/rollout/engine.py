"""A JetStream-API decoding engine over KV-cache slots (device side).

    params = engine.load_params(nnx.state(model))          # already on the mesh: no copy
    state = engine.init_decode_state()
    prefix, first = engine.prefill(params, None, padded_tokens, true_length)
    state = engine.insert(prefix, state, slot)
    state, result = engine.generate(params, state, num_steps=16)   # fused: 16 steps per host round trip

The decode state is one KV cache [layers, slots, S, kv_heads, head_dim] plus per-slot vectors, fixed in shape,
updated by jitted functions that donate it. Invariant per slot: cache rows [0, lengths) hold every token of the
slot's sequence except the last sampled one (`tokens`, "pending"), which the next decode step writes at row
`lengths`. Every turn ends on a stop string completed on the token stream (stops.StopTable), an EOS id or the
turn's token budget; the finishing token is still part of the turn.

Multi-turn rollouts use `append`: prefill(existing_prefix=slot) + insert in one jitted call, batched over the
slots that need it and writing straight into their rows. The caller passes the slot's pending token first,
then the observation; only those tokens are computed (the conversation is never prefilled again). With
fresh=True the same call prefills a new prompt into a slot from row 0. A padded chunk may run past the last
cache row: the model's cache write drops rows past the end (Qwen2ForCausalLM scatters with mode="drop"), and
tests/test_engine.py checks that this never touches real rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tspo_jax import sharding
from tspo_jax.models.qwen2 import KVCache, Qwen2ForCausalLM
from tspo_jax.rollout.interface import ResultTokens
from tspo_jax.rollout.sampling import SamplingConfig, accept_tokens, sample_tokens
from tspo_jax.rollout.stops import StopTable

jax.tree_util.register_dataclass(ResultTokens, data_fields=["tokens", "logprobs", "valid", "finish"], meta_fields=[])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """All slots' decoding state.

    cache: KVCache with k, v [num_layers, slots, S, num_kv_heads, head_dim]
    lengths: int32[slots]       cache rows holding the slot's sequence (= position of the pending token)
    tokens: int32[slots]        pending token: sampled, not yet in the cache
    keys: uint32[slots, 2]      per-slot PRNG key
    stop_states: int32[slots]   stop automaton state within the current turn
    turn_lengths: int32[slots]  tokens generated in the current turn
    budgets: int32[slots]       token budget of the current turn
    active: bool[slots]         still generating (False: free slot, or its turn has ended)
    """

    cache: KVCache
    lengths: jax.Array
    tokens: jax.Array
    keys: jax.Array
    stop_states: jax.Array
    turn_lengths: jax.Array
    budgets: jax.Array
    active: jax.Array

    @property
    def num_slots(self) -> int:
        return self.lengths.shape[0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Prefix:
    """A prefilled sequence waiting for `insert`: a one-slot DecodeState and its next-token logits f32[V]."""

    state: DecodeState
    logits: jax.Array


def default_prefill_buckets(largest: int) -> tuple[int, ...]:
    """16, 32, 64, 128, 256, then steps of 1.5x / 1.33x (384, 512, 768, 1024, ...) up to `largest`.

    Powers of two alone waste up to half of a chunk on padding (a 300-token observation in a 512 bucket);
    these keep the waste under a third with a handful of compiled shapes.
    """
    buckets, size = [], 16
    while size < largest:
        buckets.append(size)
        if size < 256:
            size *= 2
        else:  # 256 -> 384 -> 512 -> 768 -> 1024: x1.5 from a power of two, x4/3 back to the next one
            size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return tuple(buckets) + (largest,)


class Engine:
    """Slots of a Qwen2 KV cache driven with JetStream's method names; see the module docstring.

    model: a Qwen2ForCausalLM with the policy's structure, possibly abstract (nnx.eval_shape); only its structure
      is kept, the values come with `params` in every call.
    max_concurrent_decodes: number of slots. max_cache_len: rows per slot (the longest context).
    stop_table: stop strings on the token stream (None: only EOS and budgets end turns).
    eos_ids: token ids that end a turn. sampling: SamplingConfig, fixed per engine.
    prefill_buckets: padded chunk lengths (longer sequences are prefilled in chunks); default
      default_prefill_buckets(min(1024, max_cache_len)). max_prefill_batch: most rows one prefill call computes
      (more are split into several calls), which bounds the compiled shapes to buckets x log2(rows).
    mesh/rules: the trainer's mesh and sharding rules (default: one device).
    """

    def __init__(self, model: Qwen2ForCausalLM, *, max_concurrent_decodes: int, max_cache_len: int,
                 stop_table: StopTable | None = None, eos_ids: Sequence[int] = (),
                 sampling: SamplingConfig = SamplingConfig(), prefill_buckets: Sequence[int] | None = None,
                 max_prefill_batch: int = 16, mesh: jax.sharding.Mesh | None = None,
                 rules: sharding.Rules | None = None, cache_dtype=None):
        self.cfg = model.cfg
        self._graphdef, model_params = nnx.split(model)
        if max_concurrent_decodes < 1 or max_cache_len < 2:
            raise ValueError(f"Engine needs >= 1 slot and max_cache_len >= 2, got {max_concurrent_decodes}, "
                             f"{max_cache_len}")
        self._slots = max_concurrent_decodes
        self._max_cache_len = max_cache_len
        self.sampling = sampling
        self._mesh = mesh if mesh is not None else sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
        self._rules = sharding.normalize_rules(rules, self._mesh)
        self._cache_dtype = jnp.dtype(cache_dtype) if cache_dtype is not None else self.cfg.dtype
        buckets = prefill_buckets or default_prefill_buckets(min(1024, max_cache_len))
        self._buckets = tuple(sorted(set(int(b) for b in buckets)))
        if max_prefill_batch < 1:
            raise ValueError(f"max_prefill_batch must be >= 1, got {max_prefill_batch}")
        self._max_prefill_batch = max_prefill_batch
        if self._buckets[0] < 1 or self._buckets[-1] > max_cache_len:
            raise ValueError(f"prefill_buckets {self._buckets} must lie in [1, max_cache_len={max_cache_len}]")
        self._batch_shards = int(np.prod([self._mesh.shape[a] for a in _axes(self._rules.get("batch"))]))
        if max_concurrent_decodes % self._batch_shards:
            raise ValueError(f"max_concurrent_decodes={max_concurrent_decodes} must be a multiple of the "
                             f"{self._batch_shards} devices the 'batch' rule {self._rules['batch']!r} splits "
                             "slots over")
        self._param_shardings = sharding.state_shardings(model_params, self._mesh, self._rules)
        self._param_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), model_params)

        table = stop_table.transitions if stop_table is not None else np.zeros((1, self.cfg.vocab_size), np.int32)
        if table.shape[1] != self.cfg.vocab_size:
            raise ValueError(f"stop table covers {table.shape[1]} token ids but the model has vocab_size="
                             f"{self.cfg.vocab_size}; build it with token_bytes(tokenizer, cfg.vocab_size)")
        # Kept on the host until the first call needs them, so an engine can be built (and its functions
        # lowered) for compile-only devices, where nothing can be transferred.
        self._host_tables = (np.asarray(table, np.int32), np.asarray(list(eos_ids) or [-1], np.int32))
        self._device_tables = None
        self._num_stop_states = stop_table.num_states if stop_table is not None else 1

        self._cast = None
        self._empty_state_jits: dict[int, Callable[[], DecodeState]] = {}  # slots -> compiled once, reused
        self._extend_jit = jax.jit(self._extend, donate_argnums=(1,))
        self._generate_jit = jax.jit(self._generate, donate_argnums=(1,), static_argnums=(2,))
        self._insert_jit = jax.jit(self._insert, donate_argnums=(1,))

    # --- JetStream properties -----------------------------------------------------------------------------

    @property
    def max_concurrent_decodes(self) -> int:
        return self._slots

    @property
    def max_prefill_length(self) -> int:
        """Longest chunk one prefill call computes; longer sequences are prefilled in chunks."""
        return self._buckets[-1]

    @property
    def max_cache_len(self) -> int:
        return self._max_cache_len

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self._mesh

    @property
    def param_dtype(self) -> np.dtype:
        """The dtype the engine decodes from: the model's compute dtype (decode reads every weight per token)."""
        return self.cfg.dtype

    # --- params and state ---------------------------------------------------------------------------------

    def load_params(self, params: nnx.State) -> nnx.State:
        """Place a model state (nnx.state(model)) on the engine's shardings, in its compute dtype.

        Arrays already laid out that way (a bf16 policy on the same mesh) are taken as they are, without a copy.
        Anything else is moved, and fp32 master weights become a compute-dtype copy: decode reads every weight per
        token, so it should not read twice the bytes. Call after every update: no recompilation, the shapes are
        unchanged.
        """
        def place(value, target):
            if isinstance(value, jax.Array) and value.sharding.is_equivalent_to(target, value.ndim):
                return value
            return jax.device_put(value, target)

        try:
            placed = jax.tree.map(place, params, self._param_shardings)
        except ValueError as error:
            raise ValueError(f"Engine.load_params: params do not have the engine model's structure: {error}") from None
        if all(leaf.dtype == self.param_dtype for leaf in jax.tree.leaves(placed)):
            return placed
        if self._cast is None:
            dtype = self.param_dtype
            self._cast = jax.jit(lambda tree: jax.tree.map(lambda x: x.astype(dtype), tree),
                                 out_shardings=self._param_shardings)
        return self._cast(placed)

    def abstract_params(self) -> nnx.State:
        """What `load_params` returns, as ShapeDtypeStructs with shardings (for lowering without devices)."""
        return jax.tree.map(lambda a, target: jax.ShapeDtypeStruct(a.shape, self.param_dtype, sharding=target),
                            self._param_shapes, self._param_shardings)

    def _state_shardings(self, num_slots: int) -> DecodeState:
        batch = "batch" if num_slots % self._batch_shards == 0 else None  # a one-slot Prefix stays replicated

        def named(axes, shape):
            return sharding.named_sharding(self._mesh, axes, self._rules, shape=shape, what="decode state")

        cache_axes = tuple(batch if a == "batch" else a for a in KVCache.logical_axes)
        cache_shape = (self.cfg.num_layers, num_slots, self._max_cache_len, self.cfg.num_kv_heads, self.cfg.head_dim)
        vector = named((batch,), (num_slots,))
        return DecodeState(
            cache=KVCache(k=named(cache_axes, cache_shape), v=named(cache_axes, cache_shape)),
            lengths=vector, tokens=vector, keys=named((batch, None), (num_slots, 2)), stop_states=vector,
            turn_lengths=vector, budgets=vector, active=vector)

    def _empty_state(self, num_slots: int) -> DecodeState:
        # One jitted builder per slot count: a fresh jax.jit per call would trace and compile on every rollout
        # (and every fresh prefill) again.
        if num_slots not in self._empty_state_jits:
            def build():
                cache = KVCache.init(self.cfg, batch=num_slots, max_len=self._max_cache_len, dtype=self._cache_dtype)
                zeros = jnp.zeros((num_slots,), jnp.int32)
                return DecodeState(cache=cache, lengths=zeros, tokens=zeros,
                                   keys=jnp.zeros((num_slots, 2), jnp.uint32), stop_states=zeros,
                                   turn_lengths=zeros, budgets=zeros, active=jnp.zeros((num_slots,), bool))

            self._empty_state_jits[num_slots] = jax.jit(build, out_shardings=self._state_shardings(num_slots))
        return self._empty_state_jits[num_slots]()

    def abstract_decode_state(self) -> DecodeState:
        """init_decode_state()'s shapes, dtypes and shardings (traced, never run: no device is touched)."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            jax.eval_shape(self.init_decode_state), self._state_shardings(self._slots))

    def init_decode_state(self) -> DecodeState:
        """All slots free, the cache zeroed, laid out on the mesh (slots over the 'batch' rule's axes)."""
        return self._empty_state(self._slots)

    def free_resource(self, slot: int) -> None:
        """JetStream hook. Slots own no host resources: the next `insert` or fresh `append` reuses the slot."""
        if not 0 <= slot < self._slots:
            raise ValueError(f"slot {slot} is not in [0, {self._slots})")

    # --- device functions ---------------------------------------------------------------------------------

    def _constrain(self, state: DecodeState) -> DecodeState:
        return jax.lax.with_sharding_constraint(state, self._state_shardings(state.num_slots))

    def _extend(self, params, state: DecodeState, rows, tokens, true_lengths, fresh, budgets, seeds,
                stop_transitions, eos_ids):
        """Write tokens i32[n, T] after the valid rows of slots `rows` (i32[n]; rows >= slots are padding and
        dropped), sample each row's next token (the first of a new turn). fresh: bool[n] starts the slot at row 0
        with a key from seeds u32[n]. Returns the state, ResultTokens [1, slots] and next-token logits f32[n, V].
        """
        with sharding.activation_rules(self._mesh, self._rules):
            model = nnx.merge(self._graphdef, params)
            num_slots = state.num_slots
            take = jnp.clip(rows, 0, num_slots - 1)
            cache_rows = KVCache(k=state.cache.k[:, take], v=state.cache.v[:, take])
            start = jnp.where(fresh, 0, state.lengths[take])
            positions = start[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
            hidden, cache_rows = model.hidden_states_with_cache(tokens, positions, cache_rows, start)
            last = jnp.take_along_axis(hidden, (true_lengths - 1)[:, None, None], axis=1)
            logits = model.logits(last)[:, 0]
            keys = jnp.where(fresh[:, None], jax.vmap(jax.random.PRNGKey)(seeds), state.keys[take])
            token, logprob, keys = sample_tokens(logits, keys, self.sampling)
            zeros = jnp.zeros_like(token)
            stop_state, turn_length, finish = accept_tokens(
                token, zeros, zeros, budgets, stop_transitions, self._num_stop_states, eos_ids)

            def put(array, values, axis=0):
                index = (slice(None),) * axis + (rows,)
                return array.at[index].set(values.astype(array.dtype), mode="drop")

            state = DecodeState(
                cache=KVCache(k=put(state.cache.k, cache_rows.k, 1), v=put(state.cache.v, cache_rows.v, 1)),
                lengths=put(state.lengths, start + true_lengths), tokens=put(state.tokens, token),
                keys=put(state.keys, keys), stop_states=put(state.stop_states, stop_state),
                turn_lengths=put(state.turn_lengths, turn_length), budgets=put(state.budgets, budgets),
                active=put(state.active, finish == 0))
            empty = jnp.zeros((1, num_slots), jnp.int32)
            result = ResultTokens(
                tokens=put(empty, token[None], 1), logprobs=put(empty.astype(jnp.float32), logprob[None], 1),
                valid=put(empty.astype(bool), jnp.ones_like(token, bool)[None], 1),
                finish=put(empty, finish[None], 1))
            return self._constrain(state), result, logits

    def _decode_step(self, model, state: DecodeState, stop_transitions, eos_ids):
        """One token for every slot; slots that are not active keep their state (their output is invalid)."""
        hidden, cache = model.hidden_states_with_cache(state.tokens[:, None], state.lengths[:, None], state.cache,
                                                       state.lengths)
        logits = model.logits(hidden)[:, 0]
        token, logprob, keys = sample_tokens(logits, state.keys, self.sampling)
        stop_state, turn_length, finish = accept_tokens(
            token, state.stop_states, state.turn_lengths, state.budgets, stop_transitions, self._num_stop_states,
            eos_ids)
        active = state.active
        state = DecodeState(
            cache=cache, lengths=state.lengths + active.astype(jnp.int32),
            tokens=jnp.where(active, token, state.tokens), keys=jnp.where(active[:, None], keys, state.keys),
            stop_states=jnp.where(active, stop_state, state.stop_states),
            turn_lengths=jnp.where(active, turn_length, state.turn_lengths), budgets=state.budgets,
            active=active & (finish == 0))
        return state, ResultTokens(tokens=token, logprobs=logprob, valid=active, finish=jnp.where(active, finish, 0))

    def _generate(self, params, state: DecodeState, num_steps: int, stop_transitions, eos_ids):
        """Up to num_steps decode steps in one device loop; it stops early once no slot is active."""
        with sharding.activation_rules(self._mesh, self._rules):
            model = nnx.merge(self._graphdef, params)
            slots = state.num_slots
            out = ResultTokens(tokens=jnp.zeros((num_steps, slots), jnp.int32),
                               logprobs=jnp.zeros((num_steps, slots), jnp.float32),
                               valid=jnp.zeros((num_steps, slots), bool),
                               finish=jnp.zeros((num_steps, slots), jnp.int32))

            def cond(carry):
                step, state, _ = carry
                return (step < num_steps) & jnp.any(state.active)

            def body(carry):
                step, state, out = carry
                state, row = self._decode_step(model, state, stop_transitions, eos_ids)
                out = jax.tree.map(lambda buffer, value: buffer.at[step].set(value), out, row)
                return step + 1, self._constrain(state), out

            _, state, out = jax.lax.while_loop(cond, body, (jnp.int32(0), state, out))
            return state, out

    def _insert(self, prefix: Prefix, state: DecodeState, slot):
        def put(array, value, axis):
            return jax.lax.dynamic_update_slice_in_dim(array, value.astype(array.dtype), slot, axis)

        source = prefix.state
        state = DecodeState(
            cache=KVCache(k=put(state.cache.k, source.cache.k, 1), v=put(state.cache.v, source.cache.v, 1)),
            **{f.name: put(getattr(state, f.name), getattr(source, f.name), 0)
               for f in dataclasses.fields(DecodeState) if f.name != "cache"})
        return self._constrain(state)

    def _tables(self) -> tuple[jax.Array, jax.Array]:
        """The stop automaton's transitions i32[states, V] and the EOS ids i32[E], replicated on the mesh."""
        if self._device_tables is None:
            replicated = jax.sharding.NamedSharding(self._mesh, jax.sharding.PartitionSpec())
            self._device_tables = tuple(jax.device_put(table, replicated) for table in self._host_tables)
        return self._device_tables

    def lower(self, *, decode_steps: int, prefill_rows: int | None = None,
              prefill_length: int | None = None) -> dict[str, jax.stages.Lowered]:
        """The engine's jitted functions lowered for its abstract params (`abstract_params`) and decode state:
        "generate" (decode_steps fused steps) and "append" (the largest prefill call: prefill_rows rows, default
        the most one call takes, of prefill_length tokens, default max_prefill_length). Nothing is transferred,
        so this works for compile-only devices (tspo_jax.fit_check)."""
        replicated = jax.sharding.NamedSharding(self._mesh, jax.sharding.PartitionSpec())
        tables = [jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=replicated) for t in self._host_tables]
        params, state = self.abstract_params(), self.abstract_decode_state()
        rows = prefill_rows or self._row_bucket(self._slots, self._slots)
        width = prefill_length or self.max_prefill_length

        def vector(dtype, *shape):
            return jax.ShapeDtypeStruct((rows, *shape), dtype, sharding=replicated)

        append = self._extend_jit.lower(params, state, vector(jnp.int32), vector(jnp.int32, width), vector(jnp.int32),
                                        vector(jnp.bool_), vector(jnp.int32), vector(jnp.uint32), *tables)
        generate = self._generate_jit.lower(params, state, int(decode_steps), *tables)
        return {"append": append, "generate": generate}

    # --- JetStream API ------------------------------------------------------------------------------------

    def prefill(self, params: nnx.State, existing_prefix: Prefix | None, padded_tokens, true_length: int, *,
                seed: int = 0, budget: int | None = None) -> tuple[Prefix, ResultTokens]:
        """Prefill padded_tokens[:true_length] (int32[T], right-padded) after existing_prefix's context (its
        sampled token is dropped, as in chunked prefill) or from scratch; sample the first generated token.

        seed: the sequence's PRNG seed (fresh prefills only). budget: the first turn's token budget (default:
        what fits in the cache). Returns the Prefix (insert it into a slot) and the first token, ResultTokens [1, 1].
        """
        padded_tokens = np.asarray(padded_tokens, np.int32).reshape(-1)
        if existing_prefix is None:
            state = self._empty_state(1)
        else:
            state = jax.tree.map(jnp.copy, existing_prefix.state)  # a prefix may be reused: never donate it
        budget = self._max_cache_len if budget is None else budget
        state, result, logits = self._append_chunks(
            params, state, [0], [padded_tokens[:true_length]], fresh=[existing_prefix is None], budgets=[budget],
            seeds=[seed])
        return Prefix(state=state, logits=logits[0]), result

    def insert(self, prefix: Prefix, decode_state: DecodeState, slot: int) -> DecodeState:
        """Copy a prefilled sequence into `slot` of the decode state (donated)."""
        if not 0 <= slot < self._slots:
            raise ValueError(f"slot {slot} is not in [0, {self._slots})")
        return self._insert_jit(prefix, decode_state, jnp.int32(slot))

    def generate(self, params: nnx.State, decode_state: DecodeState, num_steps: int = 1
                 ) -> tuple[DecodeState, ResultTokens]:
        """Decode num_steps tokens for every active slot (JetStream: num_steps=1) in one jitted device loop.

        Returns the donated-and-updated state and ResultTokens [num_steps, slots]; the loop ends early once every
        slot's turn has finished (later rows are invalid).
        """
        return self._generate_jit(params, decode_state, int(num_steps), *self._tables())

    def append(self, params: nnx.State, decode_state: DecodeState, slots: Sequence[int],
               tokens: Sequence[np.ndarray], *, fresh: Sequence[bool], budgets: Sequence[int],
               seeds: Sequence[int]) -> tuple[DecodeState, ResultTokens]:
        """prefill(existing_prefix=slot) + insert, in place, for several slots at once.

        tokens[i] (int32[t_i], t_i >= 1) is written after the valid rows of slots[i] — for a live slot, its pending
        token followed by the observation — or from row 0 when fresh[i] (a new prompt; seeds[i] seeds its key).
        Each slot then samples the first token of a new turn with budgets[i] tokens. Returns the donated-and-updated
        state and ResultTokens [1, slots] (valid at `slots`).
        """
        state, result, _ = self._append_chunks(params, decode_state, slots, tokens, fresh=fresh, budgets=budgets,
                                               seeds=seeds)
        return state, result

    # --- host-side batching -------------------------------------------------------------------------------

    def _row_bucket(self, count: int, num_slots: int) -> int:
        """Rows of one prefill call: a power-of-two multiple of the batch shards, at most max_prefill_batch."""
        shards = self._batch_shards if num_slots % self._batch_shards == 0 else 1
        size = shards
        while size < count:
            size *= 2
        return min(size, max(self._max_prefill_batch, shards))

    def _chunk_bucket(self, length: int) -> int:
        return next(b for b in self._buckets if b >= length)

    def _append_chunks(self, params, state: DecodeState, slots, tokens, *, fresh, budgets, seeds):
        """Prefill calls for a ragged batch: each sequence in chunks of at most max_prefill_length tokens (chunk
        c of every sequence before chunk c + 1), sequences of similar length grouped into calls of at most
        max_prefill_batch rows, each call padded to a (rows, width) bucket so few shapes ever compile."""
        count = len(slots)
        if not count == len(tokens) == len(fresh) == len(budgets) == len(seeds):
            raise ValueError("append: slots, tokens, fresh, budgets and seeds must have the same length")
        num_slots = state.num_slots
        if len(set(slots)) != count or any(not 0 <= s < num_slots for s in slots):
            raise ValueError(f"append: slots {list(slots)} must be distinct and in [0, {num_slots})")
        tokens = [np.asarray(t, np.int32).reshape(-1) for t in tokens]
        for slot, seq, budget in zip(slots, tokens, budgets):
            if seq.size == 0 or budget < 1:
                raise ValueError(f"append: slot {slot} got {seq.size} tokens and budget {budget}; both must be >= 1")
            if seq.size > self._max_cache_len:
                raise ValueError(f"append: slot {slot} got {seq.size} tokens, more than max_cache_len="
                                 f"{self._max_cache_len}")
        chunk = self.max_prefill_length
        num_chunks = [-(-seq.size // chunk) for seq in tokens]
        merged = logits = None
        for c in range(max(num_chunks)):
            items = sorted((i for i in range(count) if num_chunks[i] > c),
                           key=lambda i: min(tokens[i].size - c * chunk, chunk))
            rows_per_call = self._row_bucket(len(items), num_slots)
            for start in range(0, len(items), rows_per_call):
                group = items[start:start + rows_per_call]
                pieces = [tokens[i][c * chunk:(c + 1) * chunk] for i in group]
                rows_n, width = self._row_bucket(len(group), num_slots), self._chunk_bucket(max(p.size for p in pieces))
                rows = np.full((rows_n,), num_slots, np.int32)  # out of range: dropped on write
                padded = np.zeros((rows_n, width), np.int32)
                lengths = np.ones((rows_n,), np.int32)
                is_fresh = np.zeros((rows_n,), bool)
                row_budgets = np.ones((rows_n,), np.int32)
                row_seeds = np.zeros((rows_n,), np.uint32)
                for r, (i, piece) in enumerate(zip(group, pieces)):
                    rows[r], lengths[r], padded[r, :piece.size] = slots[i], piece.size, piece
                    is_fresh[r], row_budgets[r], row_seeds[r] = bool(fresh[i]) and c == 0, budgets[i], seeds[i]
                state, result, logits = self._extend_jit(params, state, rows, padded, lengths, is_fresh,
                                                         row_budgets, row_seeds, *self._tables())
                if merged is None:
                    merged = result
                else:  # a slot's result is that of its last chunk
                    merged = jax.tree.map(lambda new, old: jnp.where(result.valid, new, old), result, merged)
        return state, merged, logits  # logits: of the last call's rows (prefill's single sequence)


def _axes(value) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)
