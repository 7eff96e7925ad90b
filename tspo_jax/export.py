"""Export a training checkpoint as a Hugging Face directory (config.json, safetensors, tokenizer).

    python -m tspo_jax.export --run_dir runs/tiny_cpu [--step 8] [--out DIR] [--dtype bfloat16]

The run's own config.gin (written at start-up) says which model and tokenizer the run trained, so only the run
directory is needed (local or gs://; a tiny model the run made is fetched from it). Only the params are read
from the checkpoint (not the optimizer state). The result loads with
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)`, and serves as
`ModelSpec.checkpoint` of a new run.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile

import jax
from flax import nnx

from tspo_jax import run_files
from tspo_jax.checkpoint import CheckpointError, RunCheckpoints
from tspo_jax.models.hf_io import export_hf_checkpoint
from tspo_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM
from tspo_jax.rollout.tokenizer import load_tokenizer
from tspo_jax.training import gin_config
from tspo_jax.training.policy import run_model_dir


def export_checkpoint(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                      step: int | None = None, dtype: str | None = None) -> pathlib.Path:
    """Writes checkpoint `step` (default: the latest) of the run in `run_dir` (local or gs://) as a Hugging Face
    directory `out_dir` (local; default RUN_DIR/export/step_N for a local run) and returns it."""
    with tempfile.TemporaryDirectory(prefix="tspo_export_") as scratch:
        return _export(run_files.run_path(run_dir, what="--run_dir"), out_dir, step, dtype, pathlib.Path(scratch))


def load_run_experiment(run_dir, scratch: pathlib.Path):
    """The Experiment (RL, `train.*`) or SFTExperiment (`sft.*`) a run directory's config.gin describes."""
    from tspo_jax import sft, train

    local_config = gin_config.run_config(run_dir, scratch, names=("config.gin",))
    load = sft.load_experiment if gin_config.run_kind(local_config.read_text()) == "sft" else train.load_experiment
    return load(gin_config.GinFlags(files=[str(local_config)]))


def _export(run_dir, out_dir, step, dtype, scratch: pathlib.Path) -> pathlib.Path:
    experiment = load_run_experiment(run_dir, scratch)
    checkpoints = RunCheckpoints(experiment.checkpoints.directory or run_dir / "checkpoints", save_every=1,
                                 read_only=True)  # the run may still be training
    step = checkpoints.committed_step(step)
    model_dir = run_model_dir(run_dir, experiment.model, scratch)
    tokenizer_dir = pathlib.Path(experiment.model.tokenizer or model_dir)
    cfg = Qwen2Config.from_hf(model_dir, param_dtype=experiment.model.param_dtype,
                              scan_layers=experiment.model.scan_layers)  # the layout the checkpoint was saved in
    abstract = nnx.eval_shape(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(abstract)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract_params)
    params = checkpoints.restore_params(step, target)
    checkpoints.close()
    if out_dir is None and run_files.is_remote(run_dir):
        raise FileNotFoundError(f"--out is required for a gs:// run directory ({run_dir}): the export is written "
                                "to local disk")
    out_dir = pathlib.Path(out_dir) if out_dir else pathlib.Path(os.fspath(run_dir)) / "export" / f"step_{step}"
    export_hf_checkpoint(nnx.merge(graphdef, params), cfg, out_dir, dtype=dtype)
    load_tokenizer(tokenizer_dir).save_pretrained(out_dir)
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tspo_jax.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run_dir", required=True, help="the RL or SFT run directory (holds config.gin)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--out", default=None, help="output directory (default: RUN_DIR/export/step_N)")
    parser.add_argument("--dtype", default=None, help="tensor dtype on disk (default: the params' dtype)")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.run_dir, args.out, step=args.step, dtype=args.dtype)
    except (CheckpointError, FileNotFoundError, gin_config.GinConfigError, run_files.RunFilesError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
