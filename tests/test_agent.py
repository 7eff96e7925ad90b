"""The multi-turn search agent loop: real tokenizers, stop tables and retrieval server; a scripted policy.

The policy is a ScriptedPolicyEngine (tests/fixtures/scripted_policy.py) so each test decides exactly what the
model emits; tests/test_agent_engine.py drives the same loop with the real engine.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from retrieval_service.client import RetrievalClient
from retrieval_service.process import RetrievalServer
from tests.fixtures.scripted_policy import ScriptedPolicyEngine, scripted_logprob
from tspo_jax.rollout import prompts as texts
from tspo_jax.rollout.agent import AgentConfig, RolloutPrompt, SearchAgent, client_retriever, extract_query
from tspo_jax.rollout.stops import STOP_STRINGS, compile_stop_table
from tspo_jax.rollout.tokenizer import encode_chat, load_tokenizer, token_bytes

QWEN_VOCAB = 151936
TINY_VOCAB = 512


@pytest.fixture(scope="module")
def qwen(qwen25_tokenizer_dir):
    tokenizer = load_tokenizer(qwen25_tokenizer_dir)
    return tokenizer, compile_stop_table(STOP_STRINGS, token_bytes(tokenizer, QWEN_VOCAB))


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer_dir):
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    return tokenizer, compile_stop_table(STOP_STRINGS, token_bytes(tokenizer, TINY_VOCAB))


@pytest.fixture(scope="module")
def client(bm25_retrieval_server):
    with RetrievalClient(bm25_retrieval_server.address, deadline_s=5.0) as client:
        yield client


@pytest.fixture(scope="module")
def search(client):
    return client_retriever(client, top_k=2)


def encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def make_prompts(tokenizer, questions):
    return [RolloutPrompt(group_id=f"q{i}", prompt_tokens=encode_chat(tokenizer, texts.build_prompt_messages(q)),
                          golds=[f"gold {i}"]) for i, q in enumerate(questions)]


def run(tokenizer, stop_table, vocab, script, retrieve, config, questions, num_samples=1, slots=2, seed=0):
    engine = ScriptedPolicyEngine(script, stop_table=stop_table, eos_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                  vocab_size=vocab, slots=slots, max_cache_len=config.max_context_tokens)
    agent = SearchAgent(engine, tokenizer, retrieve, config)
    trajectories, metrics = agent.rollout(None, make_prompts(tokenizer, questions), num_samples, seed=seed)
    return engine, trajectories, metrics


def information_tokens(tokenizer, retrieve, query):
    """The observation the agent must append for a query: open tag, documents, closing tag (each encoded)."""
    body = texts.format_documents(retrieve([query])[0])
    return sum((encode(tokenizer, part) for part in (texts.OBSERVATION_OPEN, body, texts.OBSERVATION_CLOSE)), [])


def check_record(trajectory, engine, prompt_length, max_turns):
    """Invariants every Trajectory must satisfy, checked against what the scripted policy actually saw."""
    tokens = trajectory.tokens
    assert tokens.dtype == np.int32 and trajectory.loss_mask.dtype == np.int32
    assert len(tokens) == len(trajectory.loss_mask) == len(trajectory.turn_id) == len(trajectory.sampler_logprobs)
    assert 1 <= trajectory.num_turns == len(trajectory.turn_texts) <= max_turns + 1
    assert len(trajectory.queries) == len(trajectory.observations) == trajectory.num_turns
    assert trajectory.stop_reason in {"answer", "max_turns", "context"}
    seen = [s for s in engine.sequences.values() if s[:prompt_length] == tokens[:prompt_length].tolist()]
    assert tokens.tolist() in seen  # exactly the sequence the policy saw, token for token
    generated = trajectory.loss_mask == 1
    assert not generated[:prompt_length].any() and (trajectory.turn_id[:prompt_length] == 0).all()
    np.testing.assert_array_equal(trajectory.sampler_logprobs[generated],
                                  np.float32([scripted_logprob(t) for t in tokens[generated]]))
    assert (trajectory.sampler_logprobs[~generated] == 0).all()
    turn_ids = trajectory.turn_id[prompt_length:]
    assert (np.diff(turn_ids) >= 0).all() and turn_ids.min() == 1 and turn_ids.max() == trajectory.num_turns
    for k in range(trajectory.num_turns):  # each turn: generated tokens, then its observation (if any)
        in_turn = trajectory.turn_id == k + 1
        mask = trajectory.loss_mask[in_turn]
        assert mask[0] == 1 and (np.diff(mask) <= 0).all()
        assert (trajectory.observations[k] is None) == (mask.all())


def test_turn_ends_right_after_the_token_completing_a_spanning_search_tag(qwen, search):
    tokenizer, stop_table = qwen
    turn1 = encode(tokenizer, "<think>need the capital</think>\n<search> capital of France </search>\n\nGARBAGE")
    turn2 = encode(tokenizer, "<answer> Paris </answer> trailing words")

    def script(seed, turn):
        return [turn1, turn2][turn]

    config = AgentConfig(max_turns=3, max_context_tokens=2048)
    engine, [trajectory], metrics = run(tokenizer, stop_table, QWEN_VOCAB, script, search, config,
                                        ["What is the capital of France?"])
    prompt_length = len(make_prompts(tokenizer, ["What is the capital of France?"])[0].prompt_tokens)
    check_record(trajectory, engine, prompt_length, config.max_turns)
    completing = encode(tokenizer, ">\n\n")[0]
    assert tokenizer.convert_ids_to_tokens(completing) == ">ĊĊ"  # the tag's last token carries "\n\n" along
    first_turn = turn1[: turn1.index(completing) + 1]
    assert trajectory.turn_texts[0].endswith("</search>\n\n") and "GARBAGE" not in trajectory.turn_texts[0]
    assert trajectory.queries == ["capital of France", None]
    observation = information_tokens(tokenizer, search, "capital of France")
    answer = encode(tokenizer, "<answer> Paris </answer>")
    assert turn2[: len(answer)] == answer
    assert trajectory.tokens[prompt_length:].tolist() == first_turn + observation + answer
    assert trajectory.loss_mask[prompt_length:].tolist() == [1] * len(first_turn) + [0] * len(observation) + [
        1] * len(answer)
    assert trajectory.turn_id[prompt_length:].tolist() == [1] * (len(first_turn) + len(observation)) + [2] * len(answer)
    assert trajectory.observations[0].startswith('\n\n<information>Doc 1(Title: "Paris") Paris is the capital of')
    assert trajectory.observations[0].endswith("</information>\n\n") and trajectory.observations[1] is None
    assert trajectory.stop_reason == "answer" and trajectory.turn_texts[1] == "<answer> Paris </answer>"
    assert metrics.searches == 1 and metrics.valid_actions == 2 and metrics.failed_searches == 0


def test_the_observation_is_search_r1_s_text_with_top_k_documents(qwen, client):
    tokenizer, stop_table = qwen
    query = encode(tokenizer, "<search> Tolstoy Russian Austen </search>")
    answer = encode(tokenizer, "<answer> Leo Tolstoy </answer>")
    config = AgentConfig(max_turns=2, max_context_tokens=2048)
    _, [trajectory], _ = run(tokenizer, stop_table, QWEN_VOCAB, lambda seed, turn: [query, answer][turn],
                             client_retriever(client, top_k=2), config, ["Who wrote War and Peace?"])
    # Search-R1 (search_r1/llm_agent/generation.py) renders each hit as `Doc {i}(Title: {first line of contents})
    # {rest}`, one per line, stripped, inside the tags; wiki-18's first line is the quoted title.
    assert trajectory.observations[0] == (
        '\n\n<information>Doc 1(Title: "War and Peace") War and Peace is a novel about Russian society during the '
        "Napoleonic wars. It was written by Leo Tolstoy.\n"
        'Doc 2(Title: "Pride and Prejudice") Pride and Prejudice is a novel of manners set in rural England. It was '
        "written by Jane Austen.</information>\n\n")


def test_invalid_turns_get_the_correction_and_the_final_turn_cannot_search(tiny, search):
    tokenizer, stop_table = tiny
    talk = encode(tokenizer, "I think it is old.")
    query = encode(tokenizer, "<search> Ottawa </search>")

    def script(seed, turn):
        return [talk, query, talk + query][turn]  # no tag (EOS after it), a search, a search in the final turn

    config = AgentConfig(max_turns=2, max_context_tokens=1024)
    engine, [trajectory], metrics = run(tokenizer, stop_table, TINY_VOCAB, script, search, config,
                                        ["How old is Ottawa?"])
    check_record(trajectory, engine, len(make_prompts(tokenizer, ["How old is Ottawa?"])[0].prompt_tokens), 2)
    assert trajectory.num_turns == 3 and trajectory.stop_reason == "max_turns"
    assert trajectory.turn_texts[0] == "I think it is old.<|im_end|>"
    assert trajectory.observations[0] == texts.INVALID_ACTION_TEXT
    assert trajectory.queries == [None, "Ottawa", None]  # the final turn's </search> searches nothing
    assert trajectory.observations[1].startswith('\n\n<information>Doc 1(Title: "Ottawa")')
    assert trajectory.observations[1].endswith("</information>\n\n" + texts.FINAL_TURN_TEXT)
    assert trajectory.observations[2] is None
    assert metrics.turns == 3 and metrics.searches == 1 and metrics.valid_actions == 1


def test_observations_are_cut_to_max_obs_tokens_keeping_the_closing_tag(tiny, client):
    tokenizer, stop_table = tiny
    search = client_retriever(client, top_k=5)
    query = encode(tokenizer, "<search> capital </search>")
    answer = encode(tokenizer, "<answer> Paris </answer>")
    config = AgentConfig(max_turns=2, max_obs_tokens=150, max_context_tokens=1024)
    engine, [trajectory], _ = run(tokenizer, stop_table, TINY_VOCAB, lambda seed, turn: [query, answer][turn],
                                  search, config, ["Capital?"])
    full = information_tokens(tokenizer, search, "capital")
    assert len(full) > 150
    kept = trajectory.tokens[(trajectory.turn_id == 1) & (trajectory.loss_mask == 0)].tolist()
    closing = encode(tokenizer, texts.OBSERVATION_CLOSE)
    assert len(kept) == 150 and kept[:-len(closing)] == full[:150 - len(closing)] and kept[-len(closing):] == closing
    assert trajectory.observations[0].startswith("\n\n<information>Doc 1(Title: ")
    assert trajectory.observations[0].endswith("</information>\n\n")


def test_context_limit_ends_the_trajectory_without_overflowing(tiny, search):
    tokenizer, stop_table = tiny
    query = encode(tokenizer, "<search> capital </search>")
    prompt_length = len(make_prompts(tokenizer, ["Capital?"])[0].prompt_tokens)
    config = AgentConfig(max_turns=4, max_obs_tokens=150, max_context_tokens=prompt_length + 2 * len(query) + 160)
    engine, [trajectory], metrics = run(tokenizer, stop_table, TINY_VOCAB, lambda seed, turn: query * 3, search,
                                        config, ["Capital?"])
    check_record(trajectory, engine, prompt_length, config.max_turns)
    assert trajectory.stop_reason == "context" and len(trajectory.tokens) <= config.max_context_tokens
    assert metrics.stop_reasons == {"context": 1}


def test_each_round_sends_all_queries_in_one_retrieval_call_with_continuous_batching(tiny, bm25_retrieval_server):
    tokenizer, stop_table = tiny
    calls = []
    client = RetrievalClient(bm25_retrieval_server.address)

    def retrieve(queries):
        calls.append(list(queries))
        return client.retrieve(queries, top_k=1)

    def script(seed, turn):  # every sequence searches twice, then answers
        return encode(tokenizer, ["<search> Paris </search>", "<search> Rome </search>", "<answer> x </answer>"][turn])

    config = AgentConfig(max_turns=3, max_context_tokens=1024)
    engine, trajectories, metrics = run(tokenizer, stop_table, TINY_VOCAB, script, retrieve, config,
                                        ["Q one?", "Q two?", "Q three?"], num_samples=2, slots=4)
    client.close()
    assert [(t.group_id, t.sample_index) for t in trajectories] == [(f"q{i}", j) for i in range(3) for j in range(2)]
    assert all(t.stop_reason == "answer" and t.num_turns == 3 for t in trajectories)
    assert max(len(c) for c in calls) == 4  # the four slots searched together
    assert sum(len(c) for c in calls) == 12 == metrics.searches and metrics.retrieval_calls == len(calls)
    assert len(engine.freed) == 6  # every slot was handed back, two of them reused


def test_killed_retrieval_service_mid_rollout_every_trajectory_still_ends_with_failures_counted(tiny, bm25_index):
    tokenizer, stop_table = tiny
    server = RetrievalServer(bm25_index).start()
    client = RetrievalClient(server.address, deadline_s=2.0, max_attempts=2, backoff_s=0.05)
    search = client_retriever(client, top_k=2)
    calls = []

    def retrieve(queries):
        calls.append(len(queries))
        try:
            return search(queries)
        finally:
            if len(calls) == 1:
                server.kill()  # dies after answering the first round

    config = AgentConfig(max_turns=3, max_context_tokens=1024)
    script = lambda seed, turn: encode(tokenizer, "<search> capital </search>")  # noqa: E731 (never answers)
    try:
        engine, trajectories, metrics = run(tokenizer, stop_table, TINY_VOCAB, script, retrieve, config,
                                            ["A?", "B?"], num_samples=2, slots=4)
    finally:
        client.close()
        server.kill()
    assert len(trajectories) == 4 and all(t.stop_reason == "max_turns" and t.num_turns == 4 for t in trajectories)
    assert all(t.search_failures == 2 for t in trajectories)  # rounds 2 and 3 failed, round 1 was served
    assert metrics.failed_searches == 8 == sum(t.search_failures for t in trajectories)
    for trajectory in trajectories:
        assert trajectory.observations[0].startswith("\n\n<information>Doc 1(")
        assert trajectory.observations[1] == texts.SEARCH_FAILED_TEXT
        assert trajectory.observations[2] == texts.SEARCH_FAILED_TEXT + texts.FINAL_TURN_TEXT


def test_extract_query_takes_the_last_open_tag_before_the_close():
    assert extract_query("<search> a </search>") == "a"
    assert extract_query("<search> a <search> b </search>") == "b"
    assert extract_query("b </search>") is None
    assert extract_query("<search>   </search>") is None
    assert extract_query("<search> a") is None


# --- property: arbitrary tag soup from the policy ---------------------------------------------------------------


@pytest.fixture(scope="module")
def dead_search():
    """A retriever whose service is gone: a real client pointed at a loopback port nobody listens on."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with RetrievalClient(f"127.0.0.1:{port}", deadline_s=1.0, max_attempts=1) as client:
        yield client_retriever(client, top_k=2)


SOUP = ["<search>", "</search>", "<answer>", "</answer>", "<information>", "</information>", "<think>", "</think>",
        "</", "search", ">", " ", "\n\n", "Paris", "capital of", "ö", "中", "<|im_end|>", "</search></search>",
        "<search><search>", "<answer><search>x</answer>"]


@st.composite
def policy_turn(draw, tokenizer, byte_tokens):
    """One turn of tag soup: well-formed actions, broken and nested tags, huge queries, bytes that are not UTF-8."""
    query = st.text(st.characters(categories=["L", "N", "Zs"]), min_size=1, max_size=12) | st.text(max_size=12)
    search = query.map(lambda q: encode(tokenizer, f"<search>{q}</search>"))
    pieces = draw(st.lists(st.one_of(
        search, search,  # twice: most turns should reach the retriever
        st.text(max_size=6).map(lambda a: encode(tokenizer, f"<answer>{a}</answer>")),
        st.sampled_from(SOUP).map(lambda s: encode(tokenizer, s)),
        st.text(max_size=8).map(lambda s: encode(tokenizer, s)),
        st.integers(1, 600).map(lambda n: encode(tokenizer, "<search>" + "Paris " * n + "</search>")),  # huge
        st.lists(st.sampled_from(byte_tokens), min_size=1, max_size=4),  # non-UTF-8 bytes
        st.lists(st.integers(400, TINY_VOCAB - 1), min_size=1, max_size=2),  # ids with no text at all
    ), min_size=1, max_size=5))
    return [t for piece in pieces for t in piece]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_tag_soup_never_crashes_the_loop_and_every_trajectory_ends_within_max_turns_plus_one(tiny, search, data,
                                                                                           dead_search):
    tokenizer, stop_table = tiny
    if not data.draw(st.booleans(), label="retrieval service up"):
        search = dead_search
    table = token_bytes(tokenizer, TINY_VOCAB)
    byte_tokens = [i for i, b in enumerate(table) if len(b) == 1 and b[0] >= 0x80]
    roomy = st.booleans().map(lambda b: b)  # half the cases get generous limits, so turns reach the retriever
    max_turns = data.draw(st.sampled_from([0, 1, 2, 3, 3, 3]), label="max_turns")
    turns = data.draw(st.lists(st.lists(policy_turn(tokenizer, byte_tokens), min_size=1, max_size=5),
                               min_size=4, max_size=4), label="turns per sequence")
    seeds = {}

    def script(seed, turn):
        script_for = seeds.setdefault(seed, turns[len(seeds) % len(turns)])
        return script_for[turn % len(script_for)]

    generous = data.draw(roomy, label="generous limits")
    config = AgentConfig(max_turns=max_turns,
                         max_turn_tokens=200 if generous else data.draw(st.integers(1, 200), label="turn budget"),
                         max_obs_tokens=data.draw(st.integers(130, 300), label="observation limit"),
                         max_context_tokens=1500 if generous else data.draw(st.integers(320, 1500), label="context"),
                         max_query_chars=data.draw(st.integers(1, 600), label="query limit"),
                         decode_steps_per_call=data.draw(st.integers(1, 8), label="steps per call"))
    questions = ["Capital of France?", "Who wrote Hamlet?"]
    engine, trajectories, metrics = run(tokenizer, stop_table, TINY_VOCAB, script, search, config, questions,
                                        num_samples=2, slots=3, seed=data.draw(st.integers(0, 9), label="seed"))
    assert len(trajectories) == 4 and metrics.trajectories == 4
    prompt_lengths = [len(p.prompt_tokens) for p in make_prompts(tokenizer, questions)]
    for trajectory, prompt_length in zip(trajectories, [prompt_lengths[0]] * 2 + [prompt_lengths[1]] * 2):
        check_record(trajectory, engine, prompt_length, max_turns)
        assert len(trajectory.tokens) <= config.max_context_tokens
        assert all(q is None or 0 < len(q) <= config.max_query_chars for q in trajectory.queries)
        for k, observation in enumerate(trajectory.observations):
            if observation is not None:
                in_obs = (trajectory.turn_id == k + 1) & (trajectory.loss_mask == 0)
                assert in_obs.sum() <= config.max_obs_tokens
    assert metrics.turns == sum(t.num_turns for t in trajectories)
    assert metrics.failed_searches == sum(t.search_failures for t in trajectories)
    assert metrics.failed_searches == (metrics.searches if search is dead_search else 0)
    for reason in metrics.stop_reasons:
        event(f"stop: {reason}")
    event(f"searched: {metrics.searches > 0}, search failed: {metrics.failed_searches > 0}")
