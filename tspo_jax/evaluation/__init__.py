"""Standalone evaluation (`python -m tspo_jax.evaluate`): what only a whole-benchmark evaluation needs.

The greedy rollouts and per-example records are the trainer's own (tspo_jax.training.evaluation), so a number
here and an `eval/<source>/em` of a training run mean the same thing. This package adds:

  spec.py          EvalSpec (gin name `evaluate`): model, retrieval, agent limits, scoring, mesh, slots.
  model_source.py  what `--model` names: a training run directory (and step) or a Hugging Face directory.
  store.py         the output directory: trajectories.jsonl written as examples finish, resume, shards, merge.
  table.py         the papers' table: per-data-source EM in their column order, averages, results.md/.json.
"""
