"""What a run makes for itself when it is not given it (host side): the demo data, its retrieval index, and a
tiny Qwen2 checkpoint with its tokenizer. Each is made once per run directory and reused on restart.

These are built in the run's local working directory (tspo_jax.run_files.local_work_dir). When RUN_DIR is gs://,
the tiny model is also published there (`publish`), so a restart on another machine, the other hosts of a pod
and `python -m tspo_jax.export` use the very same initial weights (`fetch`).

The tiny checkpoint is our own random init written by our HF exporter (the runtime venv has no torch), with a
byte-level BPE tokenizer trained on the demo texts (tspo_jax.rollout.tokenizer.build_tiny_tokenizer), so the
trainer loads it exactly as it loads a real Qwen2.5 directory.
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
import subprocess
import sys

log = logging.getLogger(__name__)

# Written last, so a directory interrupted half-way is rebuilt instead of trusted.
_DONE = "BOOTSTRAP_COMPLETE"


def is_complete(directory) -> bool:
    """A bootstrap directory (local pathlib or gs:// epath) that was finished, not interrupted half-way."""
    return (directory / _DONE).exists()


def publish(local: pathlib.Path, remote) -> None:
    """Copies a complete local bootstrap directory to `remote` (an epath), its completion marker last."""
    from tspo_jax.run_files import copy_tree

    if not is_complete(local):
        raise RuntimeError(f"{local} is not a complete bootstrap directory; nothing published")
    if is_complete(remote):
        return
    copy_tree(local, remote, skip={_DONE})
    (remote / _DONE).write_text((local / _DONE).read_text())
    log.info("published %s to %s", local, remote)


def fetch(remote, local: pathlib.Path) -> bool:
    """Copies a complete published bootstrap directory from `remote` to `local` (marker last); False if there
    is none."""
    from etils import epath

    from tspo_jax.run_files import copy_tree

    if is_complete(local) or not is_complete(remote):
        return is_complete(local)
    staging = pathlib.Path(f"{local}.fetch")
    for stale in (local, staging):
        if stale.exists():
            shutil.rmtree(stale)
    copy_tree(remote, epath.Path(staging))
    staging.rename(local)  # whole or not at all
    log.info("fetched %s from %s", local, remote)
    return True


def _mark_complete(directory: pathlib.Path, **facts) -> None:
    (directory / _DONE).write_text(json.dumps(facts, sort_keys=True) + "\n")


def demo_data(directory: str | pathlib.Path, *, seed: int = 0, train_world=None, test_world=None,
              recall_k: int | None = None) -> dict[str, pathlib.Path]:
    """The bundled demo world (corpus.jsonl, train.parquet, test.parquet) in `directory`, drawn with WorldConfigs
    `train_world` / `test_world` (None = tspo_jax.data.demo's defaults); rewritten when those change. recall_k:
    also log the world's retrieval ceiling, the ideal query's recall@k per split and source (the retrieval's
    top_k), and write it to `directory`/recall@k.json."""
    from tspo_jax.data.demo import make_demo_data, write_demo_data

    directory = pathlib.Path(directory)
    paths = {"corpus": directory / "corpus.jsonl", "train": directory / "train.parquet",
             "test": directory / "test.parquet"}
    configs = {k: v for k, v in (("train", train_world), ("test", test_world)) if v is not None}
    defaults = make_demo_data.__kwdefaults__
    facts = {"seed": seed, "train_world": repr(configs.get("train", defaults["train"])),
             "test_world": repr(configs.get("test", defaults["test"]))}
    done = directory / _DONE
    if not (done.exists() and json.loads(done.read_text()) == facts):
        log.info("writing the demo data to %s", directory)
        for stale in directory.glob("recall@*.json"):
            stale.unlink()
        write_demo_data(directory, fmt="parquet", seed=seed, **configs)
        _mark_complete(directory, **facts)
    if recall_k and not (directory / f"recall@{recall_k}.json").exists():
        from tspo_jax.data.demonstrations import ideal_query_recall

        recall = ideal_query_recall(make_demo_data(seed=seed, **configs), recall_k)
        (directory / f"recall@{recall_k}.json").write_text(json.dumps(recall, indent=1) + "\n")
        log.info("demo world: the ideal query's recall@%d (the retrieval ceiling) %s", recall_k,
                 ", ".join(f"{source} {value:.3f}" for source, value in recall.items()))
    return paths


def retrieval_index(corpus: str | pathlib.Path, directory: str | pathlib.Path, *, backend: str) -> pathlib.Path:
    """An index over `corpus`, built by the retrieval service's own builder CLI (in a child process, so the
    encoder's memory is returned when it ends)."""
    directory = pathlib.Path(directory)
    if (directory / "manifest.json").exists():
        return directory
    command = [sys.executable, "-m", "retrieval_service.build_index", "--corpus", str(corpus),
               "--backend", backend, "--out", str(directory), "--overwrite"]
    log.info("building the %s retrieval index: %s", backend, " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"building the retrieval index for {corpus} failed (exit {result.returncode}):\n"
                           f"{result.stderr[-3000:]}")
    return directory


DEMO_VOCAB_SIZE = 2048  # the demo tokenizer's ids fit a model vocabulary of this size


def demo_tokenizer_texts() -> list[str]:
    """What the demo tokenizer learns from: every word of every demo world, question and demonstration
    (tspo_jax.data.demo.vocabulary_texts), often enough that each becomes one token."""
    from tspo_jax.data.demo import vocabulary_texts

    return vocabulary_texts() * 50


def demo_tokenizer(directory: str | pathlib.Path) -> pathlib.Path:
    """The demo world's tokenizer: byte-level BPE (Qwen2.5's pipeline) in which every demo word is one token,
    so an entity name costs a token per word. Deterministic: the same files on every machine. (A tiny model
    made with a preset of DEMO_VOCAB_SIZE ids gets exactly this tokenizer.)"""
    from tspo_jax.rollout.tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer(demo_tokenizer_texts(), directory, vocab_size=DEMO_VOCAB_SIZE)


def demo_demonstrations(path: str | pathlib.Path, *, count: int, seed: int, config) -> pathlib.Path:
    """`count` demonstrated trajectories of the demo world drawn with DemonstrationConfig `config`, in `path`;
    written once per (count, seed, config) (a file from an interrupted or different attempt is rewritten)."""
    from tspo_jax.data.demonstrations import write_demonstrations

    path = pathlib.Path(path)
    marker = path.with_suffix(".complete")
    expected = json.dumps({"count": count, "seed": seed, "config": repr(config)})
    if path.exists() and marker.exists() and marker.read_text() == expected:
        return path
    log.info("writing %d demo demonstrations to %s", count, path)
    marker.unlink(missing_ok=True)
    write_demonstrations(path, count, seed=seed, config=config)
    marker.write_text(expected)
    return path


def tokenizer_texts(corpus: str | pathlib.Path, questions: list[str]) -> list[str]:
    """What the tiny tokenizer learns its merges from: the corpus, the questions and the agent's own texts."""
    from tspo_jax.rollout import prompts

    with open(corpus) as f:
        documents = [json.loads(line)["contents"] for line in f if line.strip()]
    agent_texts = [prompts.PROMPT_TEMPLATE, prompts.INVALID_ACTION_TEXT, prompts.SEARCH_FAILED_TEXT,
                   prompts.FINAL_TURN_TEXT, prompts.OBSERVATION_OPEN + "Doc 1(Title: x) y" + prompts.OBSERVATION_CLOSE,
                   "<think> </think> <search> </search> <answer> </answer>"]
    return documents + questions + agent_texts * 50


def tiny_checkpoint(directory: str | pathlib.Path, *, preset: str, texts: list[str], seed: int) -> pathlib.Path:
    """A random-init Qwen2 `preset` ("tiny", "demo") and a tokenizer of the same vocabulary size trained on
    `texts`, as an HF directory."""
    import jax
    from flax import nnx

    from tspo_jax.models.hf_io import export_hf_checkpoint
    from tspo_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM
    from tspo_jax.rollout.tokenizer import build_tiny_tokenizer, load_tokenizer

    directory = pathlib.Path(directory)
    if is_complete(directory):
        return directory
    if directory.exists():
        shutil.rmtree(directory)  # an interrupted earlier attempt
    cfg = Qwen2Config.preset(preset)
    log.info("making a random-init Qwen2 (preset %r) and its tokenizer (vocab %d) in %s", preset, cfg.vocab_size,
             directory)
    build_tiny_tokenizer(texts, directory, vocab_size=cfg.vocab_size)
    vocabulary = len(load_tokenizer(directory))
    if vocabulary > cfg.vocab_size:
        raise RuntimeError(f"the tiny tokenizer has {vocabulary} ids but the {preset} model only {cfg.vocab_size}")
    with jax.default_device(jax.local_devices()[0]):  # on a pod, devices()[0] may be another host's
        model = Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(seed))
    export_hf_checkpoint(model, cfg, directory)
    _mark_complete(directory, preset=preset, seed=seed, vocab_size=cfg.vocab_size)
    return directory
