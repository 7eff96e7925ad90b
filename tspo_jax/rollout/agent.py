"""The multi-turn search agent loop (host side): prompts x n samples -> Trajectory records (SPEC §2).

Continuous batching over the engine's slots: a slot whose trajectory ends takes the next waiting one at once.
Each round, every turn that ended on `</search>` contributes its query to ONE batched retrieval call; the
observation is tokenized and appended to the slot's cache (never re-prefilling the conversation).

Turn rules:
  * `</answer>` ends the trajectory ("answer").
  * `</search>` with a query: search, append `\\n\\n<information>Doc 1(Title: "t") text\\n...</information>\\n\\n`.
  * anything else (no tag, empty query, EOS or budget): append the fixed correction text, go on.
  * After `max_turns` turns (searches or not) one final turn runs with searching disabled: its observation
    says so, and a `</search>` in it searches nothing. The trajectory then ends ("answer" or "max_turns"),
    so no trajectory has more than max_turns + 1 turns.
  * Observations are cut to `max_obs_tokens` (keeping the closing tag); the whole context to
    `max_context_tokens` ("context" once no further token fits).
  * A retrieval failure (after the client's retries) gives a "search failed" observation and is counted.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from retrieval_service.client import RetrievalError
from tspo_jax.rollout import prompts as texts
from tspo_jax.rollout.interface import FINISH_BUDGET, FINISH_NONE, FINISH_STOP, ResultTokens, RolloutEngine
from tspo_jax.rollout.stops import ANSWER_STOP, SEARCH_STOP
from tspo_jax.rollout.tokenizer import token_bytes, tokens_to_text
from tspo_jax.rollout.trajectory import STOP_ANSWER, STOP_CONTEXT, STOP_MAX_TURNS, Trajectory

log = logging.getLogger(__name__)

SEARCH_OPEN, SEARCH_CLOSE = "<search>", "</search>"

Retriever = Callable[[list[str]], list[list[texts.Document]]]


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    """Limits and texts of the agent loop (SPEC §2). Texts default to tspo_jax.rollout.prompts."""

    max_turns: int = 4  # turns before the final, no-search turn
    max_turn_tokens: int = 500  # token budget of one turn
    max_obs_tokens: int = 512  # an observation is cut to this many tokens
    max_context_tokens: int = 4096  # prompt + turns + observations
    max_query_chars: int = 512  # longer queries are cut before retrieval
    decode_steps_per_call: int = 16  # decode steps per host round trip (fused on device)
    invalid_action_text: str = texts.INVALID_ACTION_TEXT
    search_failed_text: str = texts.SEARCH_FAILED_TEXT
    final_turn_text: str = texts.FINAL_TURN_TEXT
    progress_every_s: float = 30.0  # period of the progress log line

    def __post_init__(self):
        for name in ("max_turn_tokens", "max_obs_tokens", "max_context_tokens", "max_query_chars",
                     "decode_steps_per_call"):
            if getattr(self, name) < 1:
                raise ValueError(f"AgentConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_turns < 0:
            raise ValueError(f"AgentConfig.max_turns must be >= 0, got {self.max_turns}")


@dataclasses.dataclass(frozen=True)
class RolloutPrompt:
    """One prompt to sample n trajectories from. prompt_tokens: int32[P] ending with the assistant header."""

    group_id: str
    prompt_tokens: np.ndarray
    golds: list[str]


@dataclasses.dataclass
class RolloutMetrics:
    """What one `rollout` call did; `as_dict()` gives the names the trainer logs (prefix `rollout/`)."""

    trajectories: int = 0
    turns: int = 0
    searches: int = 0
    failed_searches: int = 0
    valid_actions: int = 0  # turns that searched with a query or answered
    tokens_generated: int = 0
    retrieval_calls: int = 0
    retrieval_s: float = 0.0
    model_s: float = 0.0
    wall_s: float = 0.0
    stop_reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def as_dict(self) -> dict[str, float]:
        n = max(self.trajectories, 1)
        out = {
            "rollout/trajectories": float(self.trajectories),
            "rollout/turns_per_trajectory": self.turns / n,
            "rollout/searches_per_trajectory": self.searches / n,
            "rollout/failed_searches": float(self.failed_searches),
            "rollout/valid_action_rate": self.valid_actions / max(self.turns, 1),
            "rollout/tokens_generated": float(self.tokens_generated),
            "rollout/retrieval_calls": float(self.retrieval_calls),
            "rollout/retrieval_s": self.retrieval_s,
            "rollout/model_s": self.model_s,
            "rollout/wall_s": self.wall_s,
            "rollout/tokens_per_s": self.tokens_generated / max(self.model_s, 1e-9),
        }
        out.update({f"rollout/stop_{reason}": count / n for reason, count in sorted(self.stop_reasons.items())})
        return out


@dataclasses.dataclass
class _Live:
    """A trajectory being generated (host bookkeeping)."""

    prompt: RolloutPrompt
    sample_index: int
    seed: int
    tokens: list[int]
    loss_mask: list[int]
    turn_id: list[int]
    logprobs: list[float]
    turn_start: int = 0  # index in `tokens` where the current turn begins
    finish: int = FINISH_NONE  # why the current turn ended (FINISH_NONE while it runs)
    final_turn: bool = False
    turn_texts: list[str] = dataclasses.field(default_factory=list)
    queries: list[str | None] = dataclasses.field(default_factory=list)
    observations: list[str | None] = dataclasses.field(default_factory=list)
    retrieved_titles: list[list[str] | None] = dataclasses.field(default_factory=list)
    search_failures: int = 0
    stop_reason: str | None = None


@dataclasses.dataclass(frozen=True)
class Observation:
    """Observation tokens: head and tail are kept whole; only the body (retrieved text) is ever cut."""

    head: list[int]
    body: list[int] = dataclasses.field(default_factory=list)
    tail: list[int] = dataclasses.field(default_factory=list)


class ObservationCodec:
    """The agent's observation texts as token ids (encoded once) and the one rule that assembles an observation:
    shared by the agent loop and by `tspo_jax.rollout.render` (SFT demonstrations), so a demonstrated
    trajectory renders to exactly the tokens a rollout would have produced."""

    def __init__(self, tokenizer, config: AgentConfig):
        self.tokenizer = tokenizer
        self.config = config
        self.open, self.close = self.encode(texts.OBSERVATION_OPEN), self.encode(texts.OBSERVATION_CLOSE)
        self.invalid = self.encode(config.invalid_action_text)
        self.failed = self.encode(config.search_failed_text)
        self.final = self.encode(config.final_turn_text)
        longest_fixed = max(len(self.open) + len(self.close), len(self.invalid), len(self.failed))
        if longest_fixed + len(self.final) > config.max_obs_tokens:
            raise ValueError(f"AgentConfig.max_obs_tokens={config.max_obs_tokens} cannot hold the fixed observation "
                             f"texts ({longest_fixed + len(self.final)} tokens with the final-turn notice)")

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def documents(self, documents: Sequence[texts.Document]) -> Observation:
        """`\n\n<information>Doc 1(Title: t) text\n…</information>\n\n` (SPEC §2)."""
        return Observation(head=self.open, body=self.encode(texts.format_documents(documents)), tail=self.close)

    def invalid_action(self) -> Observation:
        return Observation(head=self.invalid)

    def search_failed(self) -> Observation:
        return Observation(head=self.failed)

    def assemble(self, observation: Observation, *, final_turn: bool, room: int) -> list[int] | None:
        """The observation's tokens, with the final-turn notice when the next turn is the last, its body cut to
        fit max_obs_tokens and `room` context tokens; None when not even its fixed texts fit."""
        tail = observation.tail + self.final if final_turn else observation.tail
        fixed = len(observation.head) + len(tail)
        body_room = min(self.config.max_obs_tokens, room) - fixed
        if body_room < 0:
            return None
        return observation.head + observation.body[:body_room] + tail


def trajectory_seed(seed: int, group_id: str, sample_index: int) -> int:
    """A stable 32-bit seed per (rollout seed, group, sample): sampling does not depend on slot or batch order."""
    digest = hashlib.blake2b(f"{seed}\0{group_id}\0{sample_index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def extract_query(turn_text: str) -> str | None:
    """The text inside the last <search> before the turn's closing </search>, stripped; None if there is none."""
    end = turn_text.find(SEARCH_CLOSE)
    if end < 0:
        return None
    start = turn_text.rfind(SEARCH_OPEN, 0, end)
    if start < 0:
        return None
    query = turn_text[start + len(SEARCH_OPEN):end].strip()
    return query or None


class SearchAgent:
    """Runs search-agent rollouts on an engine against a retrieval callable.

    engine: a RolloutEngine (tspo_jax.rollout.engine.Engine) whose stop table holds STOP_STRINGS.
    tokenizer: the policy's HF tokenizer (observations are encoded with it).
    retrieve: queries -> per query a list of documents (.title, .text); e.g. `client_retriever(client, top_k)`.
    retrieval_errors: exceptions that mean "the search failed" (others propagate: they are bugs). The default
      covers RetrievalClient's RetrievalUnavailable (retries spent, deadline) and RetrievalRequestError (the
      server refused the policy's query, e.g. an oversized one).
    """

    def __init__(self, engine: RolloutEngine, tokenizer, retrieve: Retriever, config: AgentConfig = AgentConfig(),
                 *, retrieval_errors: tuple[type[BaseException], ...] = (RetrievalError, TimeoutError,
                                                                         ConnectionError)):
        if config.max_context_tokens > engine.max_cache_len:
            raise ValueError(f"AgentConfig.max_context_tokens={config.max_context_tokens} exceeds the engine's "
                             f"max_cache_len={engine.max_cache_len}")
        self.engine = engine
        self.tokenizer = tokenizer
        self.retrieve = retrieve
        self.config = config
        self.retrieval_errors = tuple(retrieval_errors)
        self._bytes = token_bytes(tokenizer, engine.vocab_size)
        self.observations = ObservationCodec(tokenizer, config)

    # --- the loop -----------------------------------------------------------------------------------------

    def rollout(self, params, prompts: Sequence[RolloutPrompt], num_samples: int, *, seed: int
                ) -> tuple[list[Trajectory], RolloutMetrics]:
        """Sample num_samples trajectories per prompt. Returns them grouped by prompt, samples in order."""
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        for prompt in prompts:
            self._check_prompt(prompt)
        metrics = RolloutMetrics()
        started = time.perf_counter()
        lives = (self._start(p, i, seed) for p in prompts for i in range(num_samples))
        done = {(t.group_id, t.sample_index): t
                for t in self._run(params, lives, metrics, total=len(prompts) * num_samples)}
        metrics.wall_s = time.perf_counter() - started
        ordered = [done[(p.group_id, i)] for p in prompts for i in range(num_samples)]
        return ordered, metrics

    def stream(self, params, prompts: Iterable[RolloutPrompt], *, seed: int, metrics: RolloutMetrics | None = None
               ) -> Iterator[Trajectory]:
        """One trajectory per prompt, yielded as each finishes (not in prompt order).

        For evaluation over many prompts: `prompts` is drawn lazily, one whenever a slot frees, so the slots stay
        full across the whole set (no batch boundaries) and a caller can save each result as it comes. Each
        trajectory is sampled with the seed `rollout(params, [prompt], 1, seed=seed)` would give it. metrics:
        updated in place.
        """
        metrics = RolloutMetrics() if metrics is None else metrics
        started = time.perf_counter()

        def lives():
            for prompt in prompts:
                self._check_prompt(prompt)
                yield self._start(prompt, 0, seed)

        try:
            yield from self._run(params, lives(), metrics, total=None)
        finally:
            metrics.wall_s += time.perf_counter() - started

    def _check_prompt(self, prompt: RolloutPrompt) -> None:
        if len(prompt.prompt_tokens) + 1 > self.config.max_context_tokens:
            raise ValueError(f"prompt of group {prompt.group_id!r} has {len(prompt.prompt_tokens)} tokens; "
                             f"max_context_tokens={self.config.max_context_tokens} leaves no room to answer")
        if len(prompt.prompt_tokens) == 0:
            raise ValueError(f"prompt of group {prompt.group_id!r} is empty")

    def _start(self, prompt: RolloutPrompt, sample_index: int, seed: int) -> _Live:
        length = len(prompt.prompt_tokens)
        return _Live(prompt=prompt, sample_index=sample_index,
                     seed=trajectory_seed(seed, prompt.group_id, sample_index),
                     tokens=[int(t) for t in prompt.prompt_tokens], loss_mask=[0] * length, turn_id=[0] * length,
                     logprobs=[0.0] * length, final_turn=self.config.max_turns == 0)

    def _run(self, params, waiting: Iterator[_Live], metrics: RolloutMetrics, *, total: int | None
             ) -> Iterator[Trajectory]:
        """The continuous-batching loop: a free slot takes the next waiting trajectory at once; finished
        trajectories are yielded as they end. total: for the progress log line (None: no log line)."""
        cfg = self.config
        started = time.perf_counter()
        finished = 0
        live: dict[int, _Live] = {}
        free = list(range(self.engine.max_concurrent_decodes))[::-1]
        state = self.engine.init_decode_state()
        appends: list[tuple[int, list[int], bool, int, int]] = []  # slot, tokens, fresh, budget, seed
        last_progress = started
        exhausted = False
        while True:
            while free and not exhausted:
                traj = next(waiting, None)
                if traj is None:
                    exhausted = True
                    break
                slot = free.pop()
                live[slot] = traj
                traj.turn_start = len(traj.tokens)
                appends.append((slot, list(traj.tokens), True, self._turn_budget(traj), traj.seed))
            if not live:
                return
            tick = time.perf_counter()
            if appends:
                slots, seqs, fresh, budgets, seeds = zip(*appends)
                state, result = self.engine.append(params, state, slots, seqs, fresh=fresh, budgets=budgets,
                                                   seeds=seeds)
                appends = []
            else:
                state, result = self.engine.generate(params, state, cfg.decode_steps_per_call)
            result = _to_host(result)
            metrics.model_s += time.perf_counter() - tick
            metrics.tokens_generated += self._consume(result, live)
            if not np.any(result.valid):
                raise RuntimeError("agent loop stalled: the engine generated nothing for the live slots")
            ended = {slot: traj for slot, traj in live.items() if traj.finish != FINISH_NONE}
            for slot, append in self._end_turns(ended, metrics).items():
                if append is None:  # the trajectory is over
                    traj = live.pop(slot)
                    self.engine.free_resource(slot)
                    free.append(slot)
                    finished += 1
                    yield self._record(traj, metrics)
                else:
                    appends.append(append)
            now = time.perf_counter()
            if total is not None and now - last_progress >= cfg.progress_every_s:
                last_progress = now
                _log_progress(finished, total, metrics, now - started)

    def _turn_budget(self, traj: _Live) -> int:
        return min(self.config.max_turn_tokens, self.config.max_context_tokens - len(traj.tokens))

    def _consume(self, result: ResultTokens, live: dict[int, _Live]) -> int:
        """Add each slot's new tokens to its trajectory; note where turns end. Returns the token count."""
        count = 0
        steps = result.valid.shape[0]
        for slot, traj in live.items():
            for k in range(steps):
                if not result.valid[k, slot]:
                    continue
                traj.tokens.append(int(result.tokens[k, slot]))
                traj.loss_mask.append(1)
                traj.turn_id.append(len(traj.turn_texts) + 1)
                traj.logprobs.append(float(result.logprobs[k, slot]))
                traj.finish = int(result.finish[k, slot])
                count += 1
        return count

    def _end_turns(self, ended: dict[int, _Live], metrics: RolloutMetrics
                   ) -> dict[int, tuple[int, list[int], bool, int, int] | None]:
        """Close the turns that ended: decide each trajectory's next step, searching all queries in one call.

        Returns per slot either the append (slot, tokens, fresh, budget, seed) that continues it, or None when
        the trajectory is over.
        """
        cfg = self.config
        searches: dict[int, str] = {}
        observations: dict[int, Observation] = {}
        for slot, traj in ended.items():
            turn_tokens = traj.tokens[traj.turn_start:]
            text = tokens_to_text(self._bytes, turn_tokens)
            traj.turn_texts.append(text)
            traj.queries.append(None)
            traj.observations.append(None)
            traj.retrieved_titles.append(None)
            metrics.turns += 1
            finish, traj.finish = traj.finish, FINISH_NONE
            context_full = finish == FINISH_BUDGET and len(traj.tokens) >= cfg.max_context_tokens
            if finish == FINISH_STOP + ANSWER_STOP:
                metrics.valid_actions += 1
                traj.stop_reason = STOP_ANSWER
            elif context_full:
                traj.stop_reason = STOP_CONTEXT
            elif traj.final_turn:
                traj.stop_reason = STOP_MAX_TURNS
            elif finish == FINISH_STOP + SEARCH_STOP and (query := extract_query(text)) is not None:
                metrics.valid_actions += 1
                searches[slot] = query[: cfg.max_query_chars]
            else:
                observations[slot] = self.observations.invalid_action()
        if searches:
            observations.update(self._search(searches, ended, metrics))
        nexts: dict[int, tuple[int, list[int], bool, int, int] | None] = {
            slot: None for slot, traj in ended.items() if traj.stop_reason is not None}
        for slot, obs in observations.items():
            nexts[slot] = self._continue(slot, ended[slot], obs)
        return nexts

    def _search(self, queries: dict[int, str], trajectories: dict[int, _Live], metrics: RolloutMetrics
                ) -> dict[int, Observation]:
        """One batched retrieval call for every query of this round -> the observation of each slot."""
        slots = list(queries)
        for slot in slots:
            trajectories[slot].queries[-1] = queries[slot]
        metrics.searches += len(slots)
        metrics.retrieval_calls += 1
        tick = time.perf_counter()
        try:
            results = self.retrieve([queries[slot] for slot in slots])
            if len(results) != len(slots):
                raise ValueError(f"retriever returned {len(results)} results for {len(slots)} queries")
        except self.retrieval_errors as error:
            log.warning("search failed for %d queries: %s", len(slots), error)
            metrics.failed_searches += len(slots)
            for slot in slots:
                trajectories[slot].search_failures += 1
            return {slot: self.observations.search_failed() for slot in slots}
        finally:
            metrics.retrieval_s += time.perf_counter() - tick
        for slot, docs in zip(slots, results):
            trajectories[slot].retrieved_titles[-1] = [doc.title for doc in docs]
        return {slot: self.observations.documents(docs) for slot, docs in zip(slots, results)}

    def _continue(self, slot: int, traj: _Live, observation: Observation):
        """Append the observation (plus the final-turn notice when due) and start the next turn; or end the
        trajectory ("context") when the context cannot take the observation and one more token."""
        cfg = self.config
        if len(traj.turn_texts) >= cfg.max_turns:
            traj.final_turn = True
        tokens = self.observations.assemble(observation, final_turn=traj.final_turn,
                                            room=cfg.max_context_tokens - len(traj.tokens) - 1)
        if tokens is None:
            traj.stop_reason = STOP_CONTEXT
            return None
        traj.observations[-1] = tokens_to_text(self._bytes, tokens)
        pending = traj.tokens[-1]  # sampled last, not yet in the slot's cache
        traj.tokens.extend(tokens)
        traj.loss_mask.extend([0] * len(tokens))
        traj.turn_id.extend([len(traj.turn_texts)] * len(tokens))
        traj.logprobs.extend([0.0] * len(tokens))
        traj.turn_start = len(traj.tokens)
        return slot, [pending] + tokens, False, self._turn_budget(traj), traj.seed

    def _record(self, traj: _Live, metrics: RolloutMetrics) -> Trajectory:
        metrics.trajectories += 1
        metrics.stop_reasons[traj.stop_reason] += 1
        return Trajectory(
            group_id=traj.prompt.group_id, sample_index=traj.sample_index, golds=list(traj.prompt.golds),
            tokens=np.asarray(traj.tokens, np.int32), loss_mask=np.asarray(traj.loss_mask, np.int32),
            turn_id=np.asarray(traj.turn_id, np.int32), sampler_logprobs=np.asarray(traj.logprobs, np.float32),
            turn_texts=traj.turn_texts, queries=traj.queries, observations=traj.observations,
            stop_reason=traj.stop_reason, num_turns=len(traj.turn_texts), search_failures=traj.search_failures,
            retrieved_titles=traj.retrieved_titles)


def _to_host(result: ResultTokens) -> ResultTokens:
    """The engine's (device) result as NumPy arrays: the only host copy per engine call."""
    return ResultTokens(tokens=np.asarray(result.tokens), logprobs=np.asarray(result.logprobs),
                        valid=np.asarray(result.valid), finish=np.asarray(result.finish))


def client_retriever(client, top_k: int) -> Retriever:
    """A Retriever over retrieval_service.client.RetrievalClient (one batched Retrieve call per round)."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    return lambda queries: client.retrieve(queries, top_k=top_k)


def _log_progress(finished: int, total: int, metrics: RolloutMetrics, elapsed: float) -> None:
    rate = metrics.tokens_generated / max(metrics.model_s, 1e-9)
    eta = elapsed / max(finished, 1) * (total - finished) if finished else float("nan")
    log.info("rollout: %d/%d trajectories, %d tokens (%.0f tok/s), retrieval %.1fs, ETA %.0fs",
             finished, total, metrics.tokens_generated, rate, metrics.retrieval_s, eta)
