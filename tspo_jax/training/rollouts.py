"""From a run's configuration to rollouts (host side): the engine + search agent on the policy's mesh, and the
tokenized prompts of a batch of QA examples. Shared by the RL trainer, SFT's evaluation and `evaluate`."""

from __future__ import annotations

from collections.abc import Sequence

from tspo_jax.rollout.agent import RolloutPrompt, SearchAgent, client_retriever
from tspo_jax.rollout.engine import Engine
from tspo_jax.rollout.prompts import build_prompt_messages
from tspo_jax.rollout.sampling import SamplingConfig
from tspo_jax.rollout.stops import STOP_STRINGS, compile_stop_table
from tspo_jax.rollout.tokenizer import encode_chat, stop_token_ids, token_bytes
from tspo_jax.training.update import batch_shards


def engine_slots(requested: int, mesh, rules) -> int:
    """`requested` decode slots rounded up so every device of the mesh's batch axes holds the same number."""
    shards = batch_shards(mesh, rules)
    return -(-requested // shards) * shards


def build_engine(policy, rollout_spec, *, slots: int, sampling: SamplingConfig, mesh=None, rules=None) -> Engine:
    """The rollout Engine for `policy` (a training.policy.PolicyModel) with `slots` decode slots.

    mesh / rules: where the engine runs (default: the policy's; on a pod, the host's own mesh). A policy of
    shapes only (no tokenizer: the fit check) gets a stop table of the same shape over single-byte tokens."""
    mesh = policy.mesh if mesh is None else mesh
    rules = policy.rules if rules is None else rules
    vocab = policy.cfg.vocab_size
    if policy.tokenizer is None:
        vocab_bytes, eos_ids = [bytes([i % 256]) for i in range(vocab)], (0,)
    else:
        vocab_bytes, eos_ids = token_bytes(policy.tokenizer, vocab), stop_token_ids(policy.tokenizer)
    return Engine(policy.abstract_model, max_concurrent_decodes=slots,
                  max_cache_len=rollout_spec.agent.max_context_tokens,
                  stop_table=compile_stop_table(STOP_STRINGS, vocab_bytes), eos_ids=eos_ids, sampling=sampling,
                  mesh=mesh, rules=rules)


def build_agent(policy, rollout_spec, retrieval_client, *, top_k: int, slots: int, sampling: SamplingConfig,
                mesh=None, rules=None) -> SearchAgent:
    """A SearchAgent over a fresh Engine (`build_engine`) for `policy` with `slots` decode slots."""
    engine = build_engine(policy, rollout_spec, slots=slots, sampling=sampling, mesh=mesh, rules=rules)
    return SearchAgent(engine, policy.tokenizer, client_retriever(retrieval_client, top_k), rollout_spec.agent)


def rollout_prompts(tokenizer, examples: Sequence, *, template: str, use_dataset_prompt: bool = False
                    ) -> list[RolloutPrompt]:
    """Tokenized prompts of QA examples; the group id is the example's uid (unique within the step: the data
    pipeline gives a prompt drawn twice in one batch a second uid).

    use_dataset_prompt: prompt with the dataset's own chat messages (Search-R1 parquet) instead of `template`."""
    prompts = []
    for example in examples:
        if use_dataset_prompt and example.prompt_messages:
            messages = [{"role": role, "content": content} for role, content in example.prompt_messages]
        else:
            messages = build_prompt_messages(example.question, template)
        prompts.append(RolloutPrompt(group_id=example.uid, prompt_tokens=encode_chat(tokenizer, messages),
                                     golds=list(example.golds)))
    return prompts
