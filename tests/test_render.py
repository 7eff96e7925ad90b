"""Demonstrations render to exactly the token stream the agent loop produces for the same turns and results.

The policy is a ScriptedPolicyEngine that emits each demonstrated turn's canonical tokens; the retriever returns
the documents the demonstration says its search returned. `render_demonstration` must give the very tokens,
loss mask and turn ids of the agent's Trajectory, for expert paths, mistakes, invalid turns, failed searches and
the final no-search turn.
"""

import pytest

from retrieval_service.client import RetrievalUnavailable
from tests.fixtures.scripted_policy import ScriptedPolicyEngine
from tspo_jax.data import demonstrations
from tspo_jax.rollout import prompts as texts
from tspo_jax.rollout.agent import AgentConfig, ObservationCodec, RolloutPrompt, SearchAgent, trajectory_seed
from tspo_jax.rollout.render import DemonstratedTurn, DemonstrationError, render_demonstration
from tspo_jax.rollout.stops import STOP_STRINGS, compile_stop_table
from tspo_jax.rollout.tokenizer import encode_chat, load_tokenizer, token_bytes
from tspo_jax.training import bootstrap

VOCAB = bootstrap.DEMO_VOCAB_SIZE
CONFIG = AgentConfig(max_turns=3, max_turn_tokens=40, max_obs_tokens=90, max_context_tokens=600)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(bootstrap.demo_tokenizer(tmp_path_factory.mktemp("demo_tokenizer")))


class _Doc:
    def __init__(self, title, text):
        self.title, self.text = title, text


def _turns(record):
    return [DemonstratedTurn(t["text"], tuple(_Doc(**d) for d in t["documents"]) if "documents" in t else None,
                             t.get("search_failed", False)) for t in record["turns"]]


def _rollout(tokenizer, records, config, failing_queries=()):
    """The agent's trajectories when the policy writes each record's turns and searches return its documents."""
    prompts = [RolloutPrompt(group_id=f"g{i}", prompt_tokens=encode_chat(
        tokenizer, texts.build_prompt_messages(r["question"])), golds=r["golds"]) for i, r in enumerate(records)]
    by_seed = {trajectory_seed(0, p.group_id, 0): r for p, r in zip(prompts, records)}
    results = {t["text"].split("<search>")[-1].split("</search>")[0].strip(): t.get("documents")
               for r in records for t in r["turns"] if "documents" in t}

    def script(seed, turn):
        turns = by_seed[seed]["turns"]
        return tokenizer.encode(turns[turn]["text"], add_special_tokens=False) if turn < len(turns) else []

    def retrieve(queries):
        if any(q in failing_queries for q in queries):
            raise RetrievalUnavailable("the test's search service is down")
        return [[_Doc(**d) for d in results[q]] for q in queries]

    stop_table = compile_stop_table(STOP_STRINGS, token_bytes(tokenizer, VOCAB))
    engine = ScriptedPolicyEngine(script, stop_table=stop_table, eos_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                  vocab_size=VOCAB, slots=4, max_cache_len=config.max_context_tokens)
    trajectories, _ = SearchAgent(engine, tokenizer, retrieve, config).rollout(None, prompts, 1, seed=0)
    return prompts, trajectories


def _assert_renders_as_rolled_out(tokenizer, records, config, failing_queries=()):
    prompts, trajectories = _rollout(tokenizer, records, config, failing_queries)
    codec = ObservationCodec(tokenizer, config)
    for prompt, trajectory, record in zip(prompts, trajectories, records):
        rendered = render_demonstration(codec, prompt.prompt_tokens, _turns(record))
        assert rendered.tokens.tolist() == trajectory.tokens.tolist(), record
        assert rendered.loss_mask.tolist() == trajectory.loss_mask.tolist()
        assert rendered.turn_id.tolist() == trajectory.turn_id.tolist()


def test_demonstrations_with_every_kind_of_mistake_render_as_the_agent_rolls_them_out(tokenizer):
    mistakes = demonstrations.MistakeRates(no_search=0.2, early_stop=0.2, wrong_entity=0.2, wrong_copy=0.2)
    records = demonstrations.draw_demonstrations(
        24, seed=5, config=demonstrations.DemonstrationConfig(mistakes=(mistakes,) * 3))
    assert {r["kind"] for r in records} >= {"expert", "no_search", "early_stop", "wrong_entity", "wrong_copy"}
    assert {r["hops"] for r in records} == {1, 2, 3}
    for record in records:  # one rollout each: names recur across demonstrations with other search results
        _assert_renders_as_rolled_out(tokenizer, [record], CONFIG)


def test_invalid_turns_failed_searches_cut_observations_and_the_final_turn_render_as_rolled_out(tokenizer):
    docs = [{"title": "Brisk Holm", "text": "Brisk Holm is a town on the Vesk river, known for salt."}] * 3
    records = [
        {"question": "Which river flows through Brisk Holm?", "golds": ["Vesk"], "turns": [
            {"text": "<think> hmm </think>"},  # neither tag: the correction text follows
            {"text": "<search> Brisk Holm </search>", "documents": docs},
            {"text": "<search> Vesk river </search>", "search_failed": True},
            {"text": "<answer> Vesk </answer>"}]},  # the final turn (max_turns = 3)
        {"question": "Which river flows through Kalen Holm?", "golds": ["Lenmir"], "turns": [
            {"text": "<search> Kalen Holm </search>", "documents": docs},
            {"text": "<search> again </search>", "documents": docs},
            {"text": "<search> and again </search>", "documents": docs},
            {"text": "<think> no searches are left </think>"}]},  # the final turn ends without an answer
    ]
    tight = AgentConfig(max_turns=3, max_turn_tokens=40, max_obs_tokens=64, max_context_tokens=600)
    # One rollout each: a failed retrieval call fails every query of its round.
    _assert_renders_as_rolled_out(tokenizer, records[:1], tight, failing_queries=("Vesk river",))
    _assert_renders_as_rolled_out(tokenizer, records[1:], tight)


@pytest.mark.parametrize("turns, reason", [
    ([{"text": "<answer> a </answer> and more"}], "continues after its first stop tag"),
    ([{"text": "<answer> a </answer>"}, {"text": "<answer> b </answer>"}], "answers, yet 1 more"),
    ([{"text": "<search> q </search>"}, {"text": "<answer> a </answer>"}], "searches but has no documents"),
    ([{"text": "<search> q </search>", "documents": []}], "the last but neither answers"),
    ([{"text": "<think> " + "word " * 60 + "</think>"}], "over AgentConfig.max_turn_tokens=40"),
])
def test_a_demonstration_the_agent_could_not_produce_is_refused_with_the_reason(tokenizer, turns, reason):
    codec = ObservationCodec(tokenizer, CONFIG)
    prompt = encode_chat(tokenizer, texts.build_prompt_messages("Which river?"))
    with pytest.raises(DemonstrationError, match=reason):
        render_demonstration(codec, prompt, _turns({"turns": turns}))
