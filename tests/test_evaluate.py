"""`python -m tspo_jax.evaluate` end to end: real retrieval servers on loopback, models written by transformers,
a real training run directory with an Orbax checkpoint.

The policy is tests/fixtures/search_policy.py: a real Qwen2 checkpoint whose weights make it search "France"
and answer "Paris" every time, so a question whose golds hold "Paris" is right and any other is wrong.

- a Search-R1 parquet holding two data sources and a JSONL file evaluate into the papers' table, and each
  source's EM equals an independent re-scoring of trajectories.jsonl with the SPEC's EM;
- a run directory and the HF directory exported from its checkpoint evaluate to the same numbers, and they are
  the checkpoint's weights (which answer "Rome"), not the run's initial model's;
- an evaluation killed midway resumes without redoing what it finished, and ends with the same table, each
  example once; so do two shards, sharing an output directory or merged from two;
- failed searches are counted and reported per source, and --redo-failed runs those examples again;
- bad input (a file in no known layout, missing golds, an unreachable service, a model without a tokenizer, an
  output directory of another evaluation or in use by another process) fails before any work, naming the
  culprit.
"""

import fcntl
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tspo_jax import evaluate
from tspo_jax.rewards import exact_match
from tests.fixtures.demo_world import tiny_run_flags

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Short turns, one device, one slot: a small engine compiles fast, and finishes examples one by one.
AGENT = ["--gin.AgentConfig.max_turns=1", "--gin.AgentConfig.max_turn_tokens=16",
         "--gin.AgentConfig.max_obs_tokens=160", "--gin.AgentConfig.max_context_tokens=512"]
SMALL = ["--gin.MeshSpec.num_devices=1", "--gin.MeshSpec.fsdp=1", "--gin.evaluate.slots=1", *AGENT]

# (data_source, question, golds): the model always answers "Paris".
PARQUET_ROWS = [
    ("nq", "What is the capital of France?", ["Paris"]),
    ("hotpotqa", "Which city is the seat of the French government?", ["Paris", "City of Paris"]),
    ("nq", "Who wrote Hamlet?", ["William Shakespeare"]),
    ("nq", "Which city hosts the Louvre?", ["paris"]),
    ("hotpotqa", "What is the longest river in Africa?", ["Nile"]),
    ("nq", "What is the capital of Japan?", ["Tokyo"]),
    ("hotpotqa", "Where was the Eiffel Tower built?", ["Lyon"]),
]
JSONL_ROWS = [
    {"question": "Who invented the telephone?", "golden_answers": ["Alexander Graham Bell"], "id": "t1"},
    {"question": "Where is the Musee d'Orsay?", "golden_answers": ["The Paris"], "id": "t2"},
]


def search_r1_parquet(path: pathlib.Path, rows) -> pathlib.Path:
    """Rows in the layout of Search-R1's data scripts (qa_search_test_merge.py)."""
    pq.write_table(pa.Table.from_pylist([
        {"data_source": source, "prompt": [{"role": "user", "content": f"Answer it.\nQuestion: {question}\n"}],
         "ability": "fact-reasoning", "reward_model": {"style": "rule", "ground_truth": {"target": golds}},
         "extra_info": {"split": "test", "index": index}}
        for index, (source, question, golds) in enumerate(rows)]), path)
    return path


def jsonl(path: pathlib.Path, rows) -> pathlib.Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """Every evaluation builds a fresh engine, whose programs are the same as the last one's: share them through
    JAX's persistent compilation cache (the subprocesses below get the same directory). JAX decides once per
    process whether the cache is on, so it is reset on the way in and out."""
    from jax._src import compilation_cache

    directory = tmp_path_factory.mktemp("jax_cache")
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {name: getattr(jax.config, name) for name in names}
    for name, value in zip(names, (str(directory), 0.0, 0)):
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    yield directory
    for name, value in saved.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def qa_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qa")
    return [search_r1_parquet(directory / "test.parquet", PARQUET_ROWS), jsonl(directory / "custom.jsonl", JSONL_ROWS)]


def run_evaluate(*args) -> int:
    return evaluate.run([str(a) for a in args])


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def hf_evaluation(tmp_path_factory, search_policy, qa_files, bm25_retrieval_server):
    """The HF directory evaluated on both files, 4 examples at a time (module-scoped: the reference the other
    tests, which run one example at a time, compare with)."""
    out = tmp_path_factory.mktemp("hf_eval") / "out"
    assert run_evaluate("--model", search_policy.model_dir, "--data", *qa_files, "--retrieval",
                        bm25_retrieval_server.address, "--out", out, *SMALL, "--gin.evaluate.slots=4") == 0
    return out


def test_two_sources_in_a_parquet_and_a_jsonl_file_give_the_papers_table_and_rescore_exactly(hf_evaluation):
    results = json.loads((hf_evaluation / "results.json").read_text())
    records = read_jsonl(hf_evaluation / "trajectories.jsonl")
    # Each example once, in data order (parquet rows, then the JSONL lines); every one searched, then answered.
    assert len({r["id"] for r in records}) == len(records)
    assert [r["question"] for r in records] == [q for _, q, _ in PARQUET_ROWS] + [r["question"] for r in JSONL_ROWS]
    assert {r["data_source"] for r in records} == {"nq", "hotpotqa", "custom"}
    for record in records:
        assert [turn["query"] for turn in record["turns"]] == ["France", None]
        assert record["prediction"] == "Paris" and record["stop_reason"] == "answer"
        assert "Paris" in record["turns"][0]["observation"]  # the real server's BM25 top hit
    # The table's EM per source is the SPEC's EM of each recorded prediction against its golds, re-scored here.
    rescored = {}
    for record in records:
        rescored.setdefault(record["data_source"], []).append(exact_match(record["prediction"], record["golds"]))
    for source, scores in rescored.items():
        assert results["per_source"][source]["em"] == pytest.approx(np.mean(scores))
        assert results["per_source"][source]["n"] == len(scores)
        assert results["per_source"][source]["failed_searches"] == 0
    assert {s: np.mean(v) for s, v in rescored.items()} == pytest.approx({"nq": 0.5, "hotpotqa": 1 / 3, "custom": 0.5})
    # The papers' layout: NQ (general), HotpotQA (multi-hop), then other sources; the macro averages.
    assert results["columns"] == ["nq", "hotpotqa", "custom"]
    assert results["average_em"] == pytest.approx((0.5 + 1 / 3 + 0.5) / 3)
    assert results["general_em"] == pytest.approx(0.5) and results["multihop_em"] == pytest.approx(1 / 3)
    markdown = (hf_evaluation / "results.md").read_text()
    assert "| Model | NQ | HotpotQA | custom | Avg. | General QA | Multi-hop QA |" in markdown
    assert "| 0.500 | 0.333 | 0.500 | 0.444 | 0.500 | 0.333 |" in markdown


def test_a_run_directory_and_its_exported_checkpoint_evaluate_to_the_same_numbers(
        tmp_path, search_policy, qa_files, demo_world, bm25_retrieval_server, hf_evaluation, capsys):
    from flax import nnx

    from tspo_jax.export import export_checkpoint
    from tspo_jax.train import Trainer, load_experiment
    from tspo_jax.training import gin_config
    from tspo_jax.training.gin_config import split_gin_flags

    # A run directory as the trainer leaves it (config files, a real Orbax checkpoint), whose step-1 weights
    # answer "Rome" where its initial model (the HF directory) answers "Paris".
    run_dir = tmp_path / "run"
    flags, _ = split_gin_flags(tiny_run_flags(run_dir, demo_world, bm25_retrieval_server.address,
                                              search_policy.model_dir, *AGENT,
                                              "--gin.UpdateSpec.min_sequence_length=512"))
    trainer = Trainer(load_experiment(flags))
    session = trainer.session
    state = nnx.to_pure_dict(session.params)
    kernel = state["lm_head"]  # float[hidden, vocab]
    state["lm_head"] = jax.device_put(search_policy.answering(kernel, vocab_axis=1), kernel.sharding)
    nnx.replace_by_pure_dict(session.params, state)
    session.save(1, force=True)
    gin_config.write_config(run_dir, operative=True)
    session.close()
    exported = export_checkpoint(run_dir, tmp_path / "exported")

    common = ["--data", *qa_files, "--retrieval", bm25_retrieval_server.address, "--gin.evaluate.slots=1"]
    assert run_evaluate("--model", f"{run_dir}:2", "--out", tmp_path / "x", *common) == 2
    assert f"--model {run_dir}:2: no checkpoint for step 2 in {run_dir / 'checkpoints'} (have [1])" in \
        capsys.readouterr().err
    assert run_evaluate("--model", run_dir, "--out", tmp_path / "x", "--retrieval", "127.0.0.1:9") == 2
    assert "no data: give --data FILE" in capsys.readouterr().err  # the run has no DataSpec.eval_files
    assert run_evaluate("--model", f"{run_dir}:1", "--out", tmp_path / "from_run", *common) == 0
    # The exported directory with the run's own settings (its operative config), as a user would evaluate it.
    assert run_evaluate("--model", exported, "--out", tmp_path / "from_hf", *common,
                        "--gin_file", run_dir / "operative_config.gin") == 0
    from_run = json.loads((tmp_path / "from_run" / "results.json").read_text())
    from_hf = json.loads((tmp_path / "from_hf" / "results.json").read_text())
    assert from_run["model"] == f"{run_dir}:1"
    assert {k: v for k, v in from_run.items() if k != "model"} == {k: v for k, v in from_hf.items() if k != "model"}
    assert read_jsonl(tmp_path / "from_run" / "trajectories.jsonl") == read_jsonl(
        tmp_path / "from_hf" / "trajectories.jsonl")
    predictions = {r["prediction"] for r in read_jsonl(tmp_path / "from_run" / "trajectories.jsonl")}
    assert predictions == {"Rome"}  # the checkpoint's weights, not the initial model's "Paris"
    assert from_run["average_em"] == 0.0
    initial = json.loads((hf_evaluation / "results.json").read_text())
    assert initial["average_em"] > 0.0


def test_a_killed_evaluation_resumes_where_it_stopped_and_ends_with_the_same_table(
        tmp_path, search_policy, qa_files, bm25_retrieval_server, hf_evaluation, compile_cache):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "tspo_jax.evaluate", "--model", str(search_policy.model_dir), "--data",
               *map(str, qa_files), "--retrieval", bm25_retrieval_server.address, "--out", str(out), *SMALL]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_COMPILATION_CACHE_DIR": str(compile_cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    victim = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    records = out / "trajectories.jsonl"
    deadline = time.monotonic() + 300
    while not (records.exists() and len(records.read_text().splitlines()) >= 3):
        assert victim.poll() is None, victim.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    victim.stderr.close()
    before = records.read_text().splitlines(keepends=True)
    finished = [line for line in before if line.endswith("\n")]
    assert 3 <= len(finished) < 9

    resumed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming: {len(finished)} of this process's 9 examples are already in {out}" in resumed.stderr
    assert f"eval {9 - len(finished)}/{9 - len(finished)} |" in resumed.stdout  # only the rest was run
    after = read_jsonl(records)
    assert sorted(r["id"] for r in after) == sorted({r["id"] for r in after})  # each example once
    assert after == read_jsonl(hf_evaluation / "trajectories.jsonl")
    kept = {json.loads(line)["id"]: json.loads(line) for line in finished}
    assert all(record == kept[record["id"]] for record in after if record["id"] in kept)
    table = json.loads((out / "results.json").read_text())
    reference = json.loads((hf_evaluation / "results.json").read_text())
    assert {k: v for k, v in table.items() if k != "model"} == {k: v for k, v in reference.items() if k != "model"}


def test_shards_write_the_table_when_the_last_one_ends_or_when_their_directories_are_merged(
        tmp_path, search_policy, qa_files, bm25_retrieval_server, hf_evaluation, capsys):
    common = ["--model", search_policy.model_dir, "--data", *qa_files, "--retrieval", bm25_retrieval_server.address,
              *SMALL]
    reference = json.loads((hf_evaluation / "results.json").read_text())
    reference_records = read_jsonl(hf_evaluation / "trajectories.jsonl")

    def same_as_reference(out):
        table = json.loads((out / "results.json").read_text())
        assert {k: v for k, v in table.items() if k != "model"} == {k: v for k, v in reference.items() if k != "model"}
        assert read_jsonl(out / "trajectories.jsonl") == reference_records
        assert not list(out.glob("trajectories.*.jsonl"))  # every shard's file merged into trajectories.jsonl

    # Two processes sharing OUT: the first to end leaves its records; the second finds every example and tabulates.
    assert run_evaluate(*common, "--out", tmp_path / "shared", "--shard", "1/2") == 0
    assert "4 of 9 examples recorded" in capsys.readouterr().out
    assert not (tmp_path / "shared" / "results.json").exists()
    shutil.copytree(tmp_path / "shared", tmp_path / "host1")  # what shard 1 left, as if on another host
    assert run_evaluate(*common, "--out", tmp_path / "shared", "--shard", "0/2") == 0
    same_as_reference(tmp_path / "shared")
    # Shard 0 on a host of its own, then the two directories merged on one machine.
    assert run_evaluate(*common, "--out", tmp_path / "host0", "--shard", "0/2") == 0
    assert not (tmp_path / "host0" / "results.json").exists()
    assert run_evaluate("--merge", tmp_path / "host1", tmp_path / "host0") == 0
    same_as_reference(tmp_path / "host1")


def test_failed_searches_are_counted_and_reported_and_redo_failed_runs_them_again(
        tmp_path, search_policy, qa_files, bm25_index, bm25_retrieval_server, hf_evaluation):
    from retrieval_service.process import RetrievalServer

    out = tmp_path / "out"
    common = ["--model", search_policy.model_dir, "--data", qa_files[0], "--out", out, *SMALL]
    # A service that refuses every query longer than 3 characters: each "France" search fails.
    with RetrievalServer(bm25_index, port=0, extra_args=["--max-query-chars", "3"]) as refusing:
        assert run_evaluate(*common, "--retrieval", refusing.address) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["failed_searches"] == 7
    assert results["per_source"]["nq"]["failed_searches"] == 4
    assert results["per_source"]["hotpotqa"]["examples_with_failed_searches"] == 3
    assert "**7 searches failed**" in (out / "results.md").read_text()
    assert all(r["search_failures"] == 1 and "search failed" in r["turns"][0]["observation"]
               for r in read_jsonl(out / "trajectories.jsonl"))
    # With a healthy service (started for the evaluation over the index), --redo-failed runs those examples again.
    assert run_evaluate(*common, "--index", bm25_index, "--redo-failed") == 0
    again = json.loads((out / "results.json").read_text())
    assert again["failed_searches"] == 0
    reference = read_jsonl(hf_evaluation / "trajectories.jsonl")[:7]
    assert read_jsonl(out / "trajectories.jsonl") == reference


@pytest.mark.parametrize("case", ["unknown layout", "missing golds", "unreachable service", "no tokenizer",
                                  "another evaluation", "output in use", "neither run nor model"])
def test_bad_input_fails_before_any_work_naming_the_culprit(
        case, tmp_path, search_policy, qa_files, bm25_retrieval_server, tiny_qwen_checkpoint, capsys, request):
    model, data, retrieval = search_policy.model_dir, [qa_files[1]], bm25_retrieval_server.address
    out = tmp_path / "out"
    if case == "unknown layout":  # FlashRAG-style columns: no data_source / prompt / reward_model
        data = [tmp_path / "flashrag.parquet"]
        pq.write_table(pa.Table.from_pylist([{"id": "1", "question": "q", "golden_answers": ["a"]}]), data[0])
        expected = [str(data[0]), "missing column(s) ['data_source', 'prompt', 'reward_model']"]
    elif case == "missing golds":
        data = [jsonl(tmp_path / "no_golds.jsonl", [JSONL_ROWS[0], {"question": "Who?", "answers": ["x"]}])]
        expected = [f"{data[0]}, line 2: missing 'golden_answers'"]
    elif case == "unreachable service":
        retrieval = "127.0.0.1:9"  # discard port: nothing listens
        expected = ["retrieval service unreachable", "127.0.0.1:9"]
    elif case == "no tokenizer":
        model = tiny_qwen_checkpoint()  # config.json + safetensors, as transformers wrote them, no tokenizer
        expected = [f"{model} has no tokenizer"]
    elif case == "another evaluation":
        out.mkdir()
        (out / "evaluation.json").write_text(json.dumps({"model": "/elsewhere/run:3", "data": []}))
        expected = [f"{out / 'evaluation.json'} records another evaluation", '"/elsewhere/run:3" there']
    elif case == "output in use":  # another process evaluating into the same OUT, as the same shard
        out.mkdir()
        busy = open(out / ".trajectories.lock", "w")
        request.addfinalizer(busy.close)
        fcntl.flock(busy, fcntl.LOCK_EX)
        expected = [f"another process is already evaluating {out} with the same --shard"]
    else:
        model = tmp_path
        expected = [f"--model {tmp_path} is neither a training run directory"]
    started = time.monotonic()
    code = run_evaluate("--model", model, "--data", *data, "--retrieval", retrieval, "--out", out, *SMALL)
    err = capsys.readouterr().err
    assert code == 2, err
    for text in expected:
        assert text in err
    assert not (out / "trajectories.jsonl").exists()
    assert time.monotonic() - started < 30
