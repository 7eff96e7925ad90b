"""The demo policy shipped in tspo_jax/data/demo_policy: the export of `make sft-demo`, with its recipe.

`make train` starts RL from it, so a fresh machine needs no hour of SFT. RECIPE.json records how it was made (the
command, the SFT run's config, steps and final numbers), the fingerprint of the demo world and demonstrations it
was trained for, and the hashes of its tokenizer and weights; tests/test_demo_policy.py checks that the shipped
files still match the code (a change to the world, its texts or its tokenizer means running `make sft-demo
SHIP=1` again).

    python -m tspo_jax.training.demo_policy --ship runs/sft_demo     # copy RUN_DIR/hf here with its recipe
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import shutil
import sys

from tspo_jax import metrics as names

DIRECTORY = pathlib.Path(__file__).resolve().parent.parent / "data" / "demo_policy"
RECIPE = "RECIPE.json"
SFT_COMMAND = "python -m tspo_jax.sft --gin_file=configs/experiments/sft_demo.gin"


def file_sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def world_fingerprint() -> str:
    """A hash of everything the demo policy learned from besides its weights: the demo vocabulary (hence its
    tokenizer), the world's document and question templates, and the demonstrations' texts and format."""
    from tspo_jax.data import demo, demonstrations

    parts = [json.dumps(demo.vocabulary_texts()),
             json.dumps(demo.make_demo_data(seed=0).corpus[:40]),
             json.dumps(demonstrations.draw_demonstrations(
                 12, seed=0, config=demonstrations.DemonstrationConfig(
                     mistakes=(demonstrations.MistakeRates(no_search=0.2, early_stop=0.2, wrong_entity=0.2,
                                                           wrong_copy=0.2),) * 3)))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def ship(run_dir: str | pathlib.Path, directory: pathlib.Path = DIRECTORY) -> pathlib.Path:
    """Copies a finished SFT run's export (RUN_DIR/hf) into `directory` and writes its RECIPE.json."""
    run_dir = pathlib.Path(run_dir)
    export = run_dir / "hf"
    if not (export / "model.safetensors").is_file():
        raise FileNotFoundError(f"{export} holds no exported policy: run `make sft-demo` to the end first")
    rows = names.read_jsonl(run_dir / "metrics.jsonl")
    last = rows[-1]
    evals = {k: v for row in rows for k, v in row.items() if k.startswith("eval/")}
    if directory.exists():
        shutil.rmtree(directory)
    shutil.copytree(export, directory)
    shutil.copy(run_dir / "config.gin", directory / "sft_config.gin")
    recipe = {
        "made_by": "make sft-demo SHIP=1",
        "command": SFT_COMMAND,
        "steps": last["step"],
        "final_nll": last.get("sft/nll"),
        "last_eval": evals,
        "sft_wall_minutes": round(sum(row.get("time/step", 0.0) + row.get("time/eval", 0.0) for row in rows) / 60, 1),
        "world_fingerprint": world_fingerprint(),
        "tokenizer_sha256": file_sha256(directory / "tokenizer.json"),
        "weights_sha256": file_sha256(directory / "model.safetensors"),
    }
    (directory / RECIPE).write_text(json.dumps(recipe, indent=1) + "\n")
    return directory


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tspo_jax.training.demo_policy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ship", required=True, metavar="RUN_DIR", help="a finished `make sft-demo` run directory")
    args = parser.parse_args(argv)
    try:
        out = ship(args.ship)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"shipped {out} ({json.loads((out / RECIPE).read_text())['weights_sha256'][:12]}…)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
