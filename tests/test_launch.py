"""Launch scripts: the TPU VM flow (create or reuse, ship, install the TPU runtime of the pinned jax, retrieval on
worker 0, training on all workers with jax.distributed) and the local flow. GCP is not reachable here, so the
gcloud side is checked two honest ways: the dry-run's printed commands, and a real run of the script against a
recording `gcloud` executable that answers `describe` like the real one (exists or not)."""

import importlib.metadata
import io
import os
import pathlib
import shlex
import stat
import subprocess
import sys
import tarfile

import pytest
from packaging.specifiers import SpecifierSet

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "launch"))
import local  # noqa: E402
import tpu_vm  # noqa: E402

TRAIN_ARGS = ["--gin_file=configs/experiments/search_r1_qwen2_5_3b.gin", "--gin.RUN_DIR='gs://b/runs/x'",
              "--gin.TRAIN_FILES=['/data/train.parquet']", "--gin.EVAL_FILES=['/data/test.parquet']"]


def _commands(output: str) -> list[list[str]]:
    return [shlex.split(line[2:]) for line in output.splitlines() if line.startswith("+ ")]


def _run_tpu_vm(capsys, *extra, gcloud="gcloud-not-installed"):
    tpu_vm.main(["--tpu", "t1", "--zone", "us-central2-b", "--accelerator-type", "v4-32", "--gcloud", gcloud,
                 *extra, "--", *TRAIN_ARGS])
    return capsys.readouterr().out


def test_dry_run_prints_every_step_for_all_workers_and_runs_nothing(capsys):
    out = _run_tpu_vm(capsys, "--model", "gs://bucket/Qwen2.5-3B", "--index", "gs://bucket/index", "--dry-run")
    commands = _commands(out)
    verbs = [c[4] for c in commands]
    assert verbs == ["describe", "create", "scp", "ssh", "ssh", "ssh", "ssh", "describe", "ssh"]
    create = commands[1]
    assert "--accelerator-type=v4-32" in create and "--zone=us-central2-b" in create
    scp, unpack, install, model, retrieval, _, train = commands[2:]
    assert "--worker=all" in scp and "--worker=all" in unpack and "--worker=all" in install
    assert "pip install --quiet -r requirements.txt -r requirements-tpu.txt" in install[-1]
    assert "--worker=all" in model and "gcloud storage cp -r gs://bucket/Qwen2.5-3B/* ~/tspo_model/" in model[-1]
    assert "--worker=0" in retrieval and "retrieval_service.serve" in retrieval[-1]
    assert "gcloud storage cp -r gs://bucket/index/*" in retrieval[-1]
    assert "--worker=all" in train
    assert "-m tspo_jax.train --distributed" in train[-1]
    assert "configs/experiments/search_r1_qwen2_5_3b.gin" in train[-1]
    assert "<worker-0-ip>:50051" in train[-1]


def test_the_printed_training_command_is_a_valid_pod_configuration(capsys):
    from tspo_jax.train import load_experiment, parse_args

    out = _run_tpu_vm(capsys, "--model", "gs://bucket/Qwen2.5-3B", "--index", "gs://bucket/index", "--dry-run")
    remote = _commands(out)[-1][-1].removeprefix("--command=")
    # What the worker's shell runs, with its $HOME.
    argv = shlex.split(remote.replace("$HOME", "/home/researcher"))
    trainer_argv = argv[argv.index("tspo_jax.train") + 1:]
    flags, args = parse_args(trainer_argv)
    assert args.distributed
    exp = load_experiment(flags)  # every binding checked, as the trainer does before any work
    assert exp.run_dir == "gs://b/runs/x"  # the shared storage every worker checkpoints into
    assert exp.model.checkpoint == "/home/researcher/tspo_model"  # the local copy made by the model step
    assert exp.retrieval.addresses == ("<worker-0-ip>:50051",)


def test_the_tpu_runtime_pins_are_what_the_pinned_jax_asks_for():
    def pins(name):
        return dict(line.split("==") for line in (ROOT / name).read_text().splitlines()
                    if "==" in line and not line.startswith("#"))

    runtime, tpu = pins("requirements.txt"), pins("requirements-tpu.txt")
    assert tpu["jax[tpu]"] == runtime["jax"] == runtime["jaxlib"]
    # jax's own metadata names the libtpu its tpu extra needs (e.g. "libtpu==0.0.42.*").
    wanted = [r for r in importlib.metadata.requires("jax") if r.startswith("libtpu") and 'extra == "tpu"' in r]
    assert wanted and SpecifierSet(wanted[0].split(";")[0].removeprefix("libtpu")).contains(tpu["libtpu"])


def _fake_gcloud(tmp_path, *, exists):
    log = tmp_path / "gcloud.log"
    script = tmp_path / "gcloud"
    describe = "echo READY; exit 0" if exists else "echo 'ERROR: NOT_FOUND' >&2; exit 1"
    script.write_text(f"""#!/bin/sh
printf '%s\\n' "$*" >> {log}
case "$*" in
  *"describe"*"ipAddress"*) echo 10.0.0.7 ;;
  *"describe"*) {describe} ;;
esac
exit 0
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script, log


@pytest.mark.parametrize("exists", [True, False])
def test_an_existing_vm_is_reused_and_a_missing_one_created(tmp_path, capsys, exists):
    gcloud, log = _fake_gcloud(tmp_path, exists=exists)
    _run_tpu_vm(capsys, "--steps", "create,retrieval,train", "--index", "/data/index", gcloud=str(gcloud))
    calls = log.read_text().splitlines()
    assert any(" create t1 " in f" {c} " for c in calls) is (not exists)
    train = calls[-1]
    assert "--worker=all" in train and "10.0.0.7:50051" in train  # worker 0's address reached the trainer


def test_a_failing_gcloud_command_stops_the_launch_naming_it(tmp_path, capsys):
    gcloud = tmp_path / "gcloud"
    gcloud.write_text("#!/bin/sh\ncase \"$*\" in *scp*) exit 3;; esac\nexit 0\n")
    gcloud.chmod(0o755)
    with pytest.raises(SystemExit, match=r"exit code 3: .*scp"):
        _run_tpu_vm(capsys, "--steps", "ship", gcloud=str(gcloud))


def test_the_shipped_code_has_the_project_but_no_venv_git_or_runs():
    data, names = tpu_vm.code_archive()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = set(tar.getnames())
    assert members == set(names)
    assert {"requirements.txt", "Makefile", "tspo_jax/checkpoint.py", "launch/tpu_vm.py"} <= members
    assert not any(m.split("/")[0] in (".venv", ".git", "runs") or m.endswith(".pyc") for m in members)


def test_training_flags_are_required(capsys):
    with pytest.raises(SystemExit):
        tpu_vm.main(["--tpu", "t", "--zone", "z", "--dry-run", "--retrieval-address", "h:1"])
    assert "after `--`" in capsys.readouterr().err


def test_local_launch_builds_a_missing_index_then_serves_on_loopback_and_trains(tmp_path, capsys):
    index = tmp_path / "index"
    local.main(["--index", str(index), "--corpus", "corpus.jsonl", "--port", "50123", "--dry-run", "--",
                "--gin_file=configs/experiments/tiny_cpu.gin"])
    build, serve, train = _commands(capsys.readouterr().out)
    assert build[1:4] == ["-m", "retrieval_service.build_index", "--corpus"] and str(index) in build
    assert serve[1:3] == ["-m", "retrieval_service.serve"] and serve[-2:] == ["--host", "127.0.0.1"]
    assert train[1:3] == ["-m", "tspo_jax.train"] and train[-1] == "--gin.RetrievalSpec.addresses=['127.0.0.1:50123']"


def test_local_launch_stops_when_the_service_dies_before_listening(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(4)"])
    with pytest.raises(SystemExit, match="exited with code 4"):
        local.wait_until_listening(local.free_loopback_port(), dead, timeout_s=30)
