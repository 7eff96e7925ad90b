"""Evaluate a search agent on QA benchmarks: one greedy multi-turn rollout per question, with the agent, prompt,
stop rules, limits and answer metric of training, tabulated as the papers report it (SPEC §10).

    python -m tspo_jax.evaluate --model (RUN_DIR[:STEP] | HF_DIR) [--data FILE …]
                                [--retrieval HOST:PORT … | --index DIR] [--out DIR] [--limit-per-source N]
                                [--shard I/N] [--name LABEL] [--redo-failed] [--gin_file F …] [--gin.NAME=VALUE …]
    python -m tspo_jax.evaluate --merge DIR [DIR …] [--out DIR] [--name LABEL]

--model RUN_DIR evaluates a training run's checkpoint (the newest, or STEP) with everything the run's operative
config says (model, tokenizer, agent limits, prompt template, scoring, data and retrieval), any of which gin flags
override; --model HF_DIR evaluates a Hugging Face directory with configs/eval.gin's Search-R1 settings.
--data: Search-R1 parquet files (one file may hold several data sources) or JSONL (default for a run: its eval
files, or its demo world's test set). Results are grouped by `data_source`.
--retrieval: running retrieval services; --index: start one on a free loopback port over an index for the
evaluation's duration (default for a run: its own RetrievalSpec).

OUT (default RUN_DIR/eval/step_N for a local run) gets trajectories.jsonl (one record per example, appended as
each finishes), results.md and results.json. Run the same command again after an interruption and it resumes:
finished examples are kept, not redone. --shard I/N makes this process one of N that share OUT (each takes every
N-th example); the last to finish writes the table. Processes whose OUT are on different machines: copy the
directories together and run --merge. A search that fails is counted per data source and reported with the
table; --redo-failed runs those examples again.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import sys
import tempfile
import time
from collections.abc import Sequence

from tspo_jax import metrics as names
from tspo_jax import run_files
from tspo_jax.checkpoint import RunCheckpoints
from tspo_jax.data import QADataError, open_sources
from tspo_jax.evaluation.model_source import (ModelSource, checkpoint_step, load_params, model_source,
                                              run_checkpoints)
from tspo_jax.evaluation.spec import EvalSpec
from tspo_jax.evaluation.store import EvalStore, Shard, StoreError, read_manifest
from tspo_jax.evaluation.table import ResultsTable, dumps, results_table
from tspo_jax.rollout.agent import RolloutMetrics
from tspo_jax.rollout.sampling import SamplingConfig
from tspo_jax.training import gin_config
from tspo_jax.training.errors import StartupError
from tspo_jax.training.evaluation import greedy_records
from tspo_jax.training.experiment import SFTExperiment
from tspo_jax.training.policy import make_mesh, open_policy, run_model_dir
from tspo_jax.training.qa_data import open_qa_data
from tspo_jax.training.retrieval import connect_retrieval
from tspo_jax.training.rollouts import build_agent, engine_slots, rollout_prompts

log = logging.getLogger("tspo_jax.evaluate")

EVAL_FRAME = "configs/eval.gin"


@dataclasses.dataclass(frozen=True)
class Settings:
    """The evaluation as configured: spec (EvalSpec), use_dataset_prompt (DataSpec.use_dataset_prompt), and for a
    run directory its Experiment or SFTExperiment (data, local_dir, checkpoint directory) and its kind ("train"
    or "sft", whose settings those are), else None."""

    spec: EvalSpec
    use_dataset_prompt: bool
    run: object | None
    run_kind: str | None = None

    @property
    def run_data(self):
        """The DataSpec the run evaluated on: an RL run's `data`, an SFT run's `eval_data` (None: it had none)."""
        return getattr(self.run, "eval_data", None) if isinstance(self.run, SFTExperiment) else self.run.data

    def manifest_settings(self) -> dict:
        """What changes an example's result (so a resumed or merged evaluation must share it)."""
        spec = self.spec
        agent = dataclasses.asdict(spec.rollout.agent)
        for speed_only in ("decode_steps_per_call", "progress_every_s"):
            agent.pop(speed_only)
        return {"agent": agent, "prompt_template": spec.rollout.prompt_template,
                "use_dataset_prompt": self.use_dataset_prompt, "scoring": dataclasses.asdict(spec.scoring),
                "top_k": spec.retrieval.top_k, "dtype": spec.model.dtype, "param_dtype": spec.model.param_dtype}


def load_settings(source: ModelSource, flags: gin_config.GinFlags, scratch: pathlib.Path) -> Settings:
    """configs/eval.gin, then (for a run) the run's recorded config, then the command line's gin flags."""
    import gin

    from tspo_jax import configurables  # registers everything gin may bind

    files, kind = [EVAL_FRAME], None
    if source.is_run:
        try:
            run_config = gin_config.run_config(source.run_dir, scratch)
        except FileNotFoundError as error:
            raise StartupError(f"--model {source.text}: {error}") from None
        files.append(str(run_config))
        kind = gin_config.run_kind(run_config.read_text())  # "train" (RL) or "sft"
    spec, run = gin_config.build(dataclasses.replace(flags, files=files + flags.files),
                                 lambda: (configurables.evaluate(), getattr(configurables, kind)() if kind else None))
    return Settings(spec=spec, use_dataset_prompt=gin.query_parameter("DataSpec.use_dataset_prompt"), run=run,
                    run_kind=kind)


def retrieval_spec(spec, args) -> object:
    """RetrievalSpec with --retrieval / --index in place of the configured service."""
    if args.retrieval:
        return dataclasses.replace(spec, addresses=tuple(args.retrieval), index_dir=None)
    if args.index:
        return dataclasses.replace(spec, addresses=(), index_dir=args.index)
    return spec


@dataclasses.dataclass(frozen=True)
class Examples:
    """The evaluation's questions in data order (all shards'), the files they came from and the run's demo world
    (its corpus is what a demo run's retrieval serves)."""

    examples: list
    sources: list
    demo_paths: dict | None

    def manifest(self) -> dict:
        counts: dict[str, int] = {}
        for example in self.examples:
            counts[example.data_source] = counts.get(example.data_source, 0) + 1
        return {"data": [{"path": str(s.path), "name": s.name} for s in self.sources], "examples": counts}


def open_examples(args, source: ModelSource, settings: Settings) -> Examples:
    run, demo_paths, sources = settings.run, None, None
    run_data = settings.run_data if run is not None else None
    if run_data is not None and (run_data.demo or not args.data):
        local_dir = run_files.local_work_dir(source.run_dir, run.local_dir, what=f"{settings.run_kind}.local_dir")
        qa = open_qa_data(run_data, local_dir=local_dir, eval_only=True)
        demo_paths, sources = qa.demo_paths, qa.eval_sources
    if args.data:
        try:
            sources = open_sources(args.data)
        except QADataError as error:
            raise StartupError(f"--data: {error}") from None
    if not sources:
        raise StartupError(f"--model {source.text}: no data: give --data FILE … (the run has no DataSpec.eval_files)"
                           if run is not None else "--data FILE … is required with a Hugging Face model directory")
    taken: dict[str, int] = {}
    examples = []
    for qa_source in sources:
        for row in range(len(qa_source)):
            example = qa_source[row]
            if args.limit_per_source is None or taken.get(example.data_source, 0) < args.limit_per_source:
                taken[example.data_source] = taken.get(example.data_source, 0) + 1
                examples.append(example)
    return Examples(examples=examples, sources=sources, demo_paths=demo_paths)


def data_order(manifest: dict):
    """Sort key of a record in data order: (file, row), from its id `<source name>:<row>` (tspo_jax.data)."""
    position = {entry["name"]: i for i, entry in enumerate(manifest["data"])}

    def key(record: dict):
        name, _, row = record["id"].rpartition(":")
        return position[name], int(row)

    return key


# ----------------------------------------------------------------------------------------------------------------
class Progress:
    """`eval 40/76 | 1.93 examples/s | 820 tokens/s | ETA 0m19s | em 0.125 | failed searches 0` at most every
    `every_s` seconds (stdout), each also appended as a JSON row to OUT/progress*.jsonl."""

    def __init__(self, total: int, metrics: RolloutMetrics, log_file, *, every_s: float):
        self.total, self.metrics, self.log_file, self.every_s = total, metrics, log_file, every_s
        self.started = self.last = time.monotonic()
        self.first = None  # when the first example ended: the time before it is mostly compilation
        self.done = 0
        self.correct = 0.0

    def update(self, record: dict) -> None:
        self.done += 1
        self.correct += record["em"]
        now = time.monotonic()
        self.first = self.first or now
        if now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            self.report(now)

    def report(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        # The ETA extrapolates the rate since the first example ended (no estimate before a second one has).
        since_first = (self.done - 1) / (now - self.first) if self.done > 1 and now > self.first else 0.0
        row = {"time": time.time(), "done": self.done, "total": self.total, "elapsed_s": elapsed,
               "examples_per_s": rate, "tokens_per_s": self.metrics.tokens_generated / elapsed,
               "eta_s": 0.0 if self.done == self.total else (self.total - self.done) / since_first if since_first
               else None,
               "em": self.correct / max(self.done, 1), "failed_searches": self.metrics.failed_searches}
        eta = names.format_duration(row["eta_s"] if row["eta_s"] is not None else float("inf"))
        print(f"eval {self.done}/{self.total} | {rate:.3g} examples/s | {row['tokens_per_s']:.0f} tokens/s | "
              f"ETA {eta} | em {row['em']:.3f} | failed searches {row['failed_searches']}", flush=True)
        self.log_file.write(json.dumps(row) + "\n")
        self.log_file.flush()

    def summary(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        m = self.metrics
        return (f"{self.done} examples in {elapsed:.1f}s: {self.done / elapsed:.3g} examples/s, "
                f"{elapsed / max(self.done, 1):.3g} s/example; {m.tokens_generated} tokens generated: "
                f"{m.tokens_generated / elapsed:.0f} tokens/s overall, {m.tokens_generated / max(m.model_s, 1e-9):.0f} "
                f"tokens/s in the model; {m.searches} searches in {m.retrieval_calls} retrieval calls "
                f"({m.retrieval_s:.1f}s), {m.failed_searches} failed")


# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Plan:
    """What is evaluated, decided (and checked) before a service or a model is touched.

    spec: the EvalSpec with --retrieval / --index applied. checkpoints / step: the run's (None for an HF directory).
    todo: this process's examples that OUT has no record of yet.
    """

    source: ModelSource
    settings: Settings
    spec: EvalSpec
    data: Examples
    store: EvalStore
    checkpoints: RunCheckpoints | None
    step: int | None
    todo: list


def evaluate(args, flags: gin_config.GinFlags) -> tuple[EvalStore, ResultsTable | None]:
    """Runs (or resumes) this process's share of the evaluation; returns OUT and, once every example is done,
    the table."""
    with tempfile.TemporaryDirectory(prefix="tspo_eval_") as scratch, contextlib.ExitStack() as stack:
        plan = make_plan(args, flags, pathlib.Path(scratch), stack)
        if plan.todo:
            run_rollouts(plan, args, stack)
    return plan.store, finish(plan.store, args)


def make_plan(args, flags: gin_config.GinFlags, scratch: pathlib.Path, stack: contextlib.ExitStack) -> Plan:
    source = model_source(args.model)
    settings = load_settings(source, flags, scratch)
    spec = dataclasses.replace(settings.spec, retrieval=retrieval_spec(settings.spec.retrieval, args))
    checkpoints = step = None
    if source.is_run:
        checkpoints = run_checkpoints(source, settings.run.checkpoints.directory)
        stack.callback(checkpoints.close)
        step = checkpoint_step(checkpoints, source)
    elif spec.model.checkpoint and pathlib.Path(spec.model.checkpoint).resolve() != source.hf_dir.resolve():
        log.info("ModelSpec.checkpoint = %r is not used: --model %s is what is evaluated", spec.model.checkpoint,
                 source.hf_dir)  # e.g. an export evaluated with its run's operative_config.gin
    data = open_examples(args, source, settings)
    model = f"{os.fspath(source.run_dir)}:{step}" if source.is_run else os.fspath(source.hf_dir)
    out = pathlib.Path(args.out) if args.out else default_out(source, step)
    store = EvalStore(out, {"model": model, **data.manifest(), "limit_per_source": args.limit_per_source,
                            "settings": settings.manifest_settings()})
    log.info("evaluating %s on %d examples (%s) into %s", model, len(data.examples),
             ", ".join(f"{k} {v}" for k, v in store.manifest["examples"].items()), out)
    stack.enter_context(store.claim(args.shard))
    if args.redo_failed:
        failed = {r["id"] for r in store.records().values() if r["search_failures"]}
        log.info("--redo-failed: %d examples had a failed search; they run again", store.drop(failed))
    done = store.records()
    mine = args.shard.take(data.examples)
    todo = [example for example in mine if example.uid not in done]
    if len(todo) < len(mine):
        log.info("resuming: %d of this process's %d examples are already in %s", len(mine) - len(todo), len(mine),
                 out)
    return Plan(source=source, settings=settings, spec=spec, data=data, store=store, checkpoints=checkpoints,
                step=step, todo=todo)


def default_out(source: ModelSource, step: int | None) -> pathlib.Path:
    if source.is_run and not run_files.is_remote(source.run_dir):
        return pathlib.Path(os.fspath(source.run_dir)) / "eval" / f"step_{step}"
    raise StartupError(f"--out DIR is required for --model {source.text} (results are written to local disk)")


def run_rollouts(plan: Plan, args, stack: contextlib.ExitStack) -> None:
    """Retrieval, then the model, then greedy rollouts over `plan.todo`, each record saved as its example ends."""
    spec, source, shard = plan.spec, plan.source, args.shard
    log_dir = plan.store.out_dir / (f"shard-{shard.index}-of-{shard.count}" if shard.count > 1 else "")
    log_dir.mkdir(exist_ok=True)
    demo = plan.data.demo_paths
    retrieval = connect_retrieval(spec.retrieval, stack, local_dir=log_dir, demo_corpus=demo and demo["corpus"])
    mesh, rules = make_mesh(spec.mesh)
    with tempfile.TemporaryDirectory(prefix="tspo_eval_model_") as scratch:
        try:
            model_dir = run_model_dir(source.run_dir, spec.model, pathlib.Path(scratch)) if source.is_run \
                else source.hf_dir
        except FileNotFoundError as error:
            raise StartupError(f"--model {source.text}: {error}") from None
        policy = open_policy(spec.model, model_dir, mesh, rules)
    params = load_params(policy, plan.checkpoints, plan.step)
    try:
        agent = build_agent(policy, spec.rollout, retrieval, top_k=spec.retrieval.top_k,
                            slots=engine_slots(spec.slots, mesh, rules), sampling=SamplingConfig(temperature=0.0))
    except ValueError as error:  # limits the model's tokenizer cannot meet, named by their binding
        raise StartupError(str(error)) from None
    params = agent.engine.load_params(params)

    def prompts(examples):
        return rollout_prompts(policy.tokenizer, examples, template=spec.rollout.prompt_template,
                               use_dataset_prompt=plan.settings.use_dataset_prompt)

    metrics = RolloutMetrics()
    with plan.store.writer(shard) as append, plan.store.progress_log(shard) as progress_file:
        progress = Progress(len(plan.todo), metrics, progress_file, every_s=args.progress_every)
        for record in greedy_records(agent, params, plan.todo, prompts=prompts, scoring=spec.scoring,
                                     metrics=metrics):
            append(record)
            progress.update(record)
    print(progress.summary(), flush=True)


def finish(store: EvalStore, args) -> ResultsTable | None:
    """Under the directory's lock: when every example has its record, merge them and write the table."""
    manifest = store.manifest
    with store.lock():
        records = store.records()
        counts: dict[str, int] = {}
        for record in records.values():
            counts[record["data_source"]] = counts.get(record["data_source"], 0) + 1
        expected = manifest["examples"]
        if counts != expected:
            missing = sum(expected.values()) - sum(counts.values())
            print(f"{store.out_dir}: {sum(counts.values())} of {sum(expected.values())} examples recorded; the table "
                  f"is written when the other {missing} are (by the processes still running, or a --merge of their "
                  "output directories)", flush=True)
            return None
        table = results_table(args.name or manifest["model"], store.merge(order=data_order(manifest)))
        store.write_results(table.to_markdown(), dumps(table))
    return table


def merge(dirs: Sequence[str], args) -> tuple[EvalStore, ResultsTable | None]:
    """Copies the records of every directory in `dirs` into OUT (default: the first), which must all hold the
    same evaluation, then writes the table if every example is there."""
    manifest = read_manifest(pathlib.Path(dirs[0]))
    store = EvalStore(args.out or dirs[0], manifest)
    for k, directory in enumerate(dirs):
        read_manifest(pathlib.Path(directory))  # each must be an evaluation's output directory
        other = EvalStore(directory, manifest)  # and of this evaluation
        if other.out_dir.resolve() == store.out_dir.resolve():
            continue
        for i, path in enumerate(other.record_files()):
            (store.out_dir / f"trajectories.merged-{k}-{i}.jsonl").write_bytes(path.read_bytes())
    return store, finish(store, args)


# ----------------------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str]) -> tuple[gin_config.GinFlags, argparse.Namespace]:
    flags, rest = gin_config.split_gin_flags(argv)
    parser = argparse.ArgumentParser(prog="python -m tspo_jax.evaluate", description=__doc__.split("\n\n")[0],
                                     epilog="gin flags: --gin_file F (repeatable), --gin.NAME=VALUE, "
                                            "--gin_bindings 'NAME = VALUE', --gin_search_path DIR")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="RUN_DIR[:STEP] (a training run; default: its newest checkpoint) or HF_DIR")
    what.add_argument("--merge", nargs="+", metavar="DIR", help="merge the records of these output directories")
    parser.add_argument("--data", nargs="+", metavar="FILE", help="Search-R1 .parquet or .jsonl QA files")
    parser.add_argument("--retrieval", nargs="+", metavar="HOST:PORT", help="running retrieval service(s)")
    parser.add_argument("--index", metavar="DIR", help="start a retrieval service over this index")
    parser.add_argument("--out", help="output directory (default: RUN_DIR/eval/step_N)")
    parser.add_argument("--limit-per-source", type=int, metavar="N", help="at most N examples of each data_source")
    parser.add_argument("--shard", type=Shard.parse, default=Shard(), metavar="I/N",
                        help="this process takes every N-th example from the I-th (0-based)")
    parser.add_argument("--name", help="the table row's label (default: the model path and step)")
    parser.add_argument("--redo-failed", action="store_true",
                        help="run again the examples that had a failed search (with no other process on --out)")
    parser.add_argument("--progress-every", type=float, default=10.0, metavar="S",
                        help="seconds between progress lines")
    args = parser.parse_args(rest)
    if args.limit_per_source is not None and args.limit_per_source < 1:
        parser.error(f"--limit-per-source must be >= 1, got {args.limit_per_source}")
    if args.retrieval and args.index:
        parser.error("give --retrieval HOST:PORT (running services) or --index DIR (start one), not both")
    if args.merge and (args.data or args.retrieval or args.index or flags.files or flags.bindings):
        parser.error("--merge only reads output directories: it takes no --data, --retrieval, --index or gin flags")
    return flags, args


def run(argv: Sequence[str]) -> int:
    """The command without its logging set-up; returns the exit code (2: bad input, named on stderr)."""
    try:
        flags, args = parse_args(argv)
    except gin_config.GinConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        store, table = merge(args.merge, args) if args.merge else evaluate(args, flags)
    except (StartupError, StoreError, gin_config.GinConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if table is None:
        return 0
    out = store.out_dir
    print(table.to_markdown(), end="", flush=True)
    print(f"results in {out / 'results.md'} and {out / 'results.json'}; every example in {out / 'trajectories.jsonl'}")
    if table.failed_searches:
        log.warning("%d searches failed: see the note under the table; --redo-failed runs those examples again",
                    table.failed_searches)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax narrates every restore at INFO
    return run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
