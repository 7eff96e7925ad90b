"""Run files on local disk and on gs:// (a real GCS emulator on loopback): which URLs a run accepts, the start-up
write probe, the local working directory, the metrics log (rewritten whole on GCS, trimmed on resume), and a tiny
model published to a gs:// run directory and fetched back bit for bit."""

import os
import pathlib

import pytest

from tspo_jax import metrics as names
from tspo_jax import run_files
from tspo_jax.training import bootstrap


def test_a_local_run_dir_is_made_absolute_and_is_its_own_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = run_files.run_path("runs/x", what="RUN_DIR")
    assert os.fspath(path) == str(tmp_path / "runs" / "x")
    assert run_files.local_work_dir(path, None, what="train.local_dir") == tmp_path / "runs" / "x"


def test_a_gcs_run_dir_stays_a_url_and_works_locally_in_the_cache(tmp_path):
    path = run_files.run_path("gs://bucket/runs/x", what="RUN_DIR")
    assert os.fspath(path) == "gs://bucket/runs/x" and run_files.is_remote(path)
    assert run_files.local_work_dir(path, None, what="train.local_dir") == pathlib.Path(
        "~/.cache/tspo_jax/runs/bucket/runs/x").expanduser()
    assert run_files.local_work_dir(path, str(tmp_path), what="train.local_dir") == tmp_path


@pytest.mark.parametrize("url", ["s3://bucket/run", "hf://org/run", "ftp://host/run"])
def test_other_url_schemes_are_refused_naming_the_setting(url):
    with pytest.raises(run_files.RunFilesError, match=f"RUN_DIR = '{url}': only local paths and gs://"):
        run_files.run_path(url, what="RUN_DIR")


def test_a_read_only_local_run_dir_fails_the_write_probe_naming_it(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permission bits: use a path under a regular file instead
            locked = tmp_path / "a_file"
            locked.write_text("x")
            locked = locked / "run"
        with pytest.raises(run_files.RunFilesError, match=f"RUN_DIR {locked} is not writable"):
            run_files.check_writable(run_files.run_path(str(locked), what="RUN_DIR"), what="RUN_DIR")
    finally:
        (tmp_path / "locked").chmod(0o700)


def test_the_write_probe_passes_on_gcs_and_leaves_nothing_behind(gcs_env):
    path = run_files.run_path(gcs_env.url("probe/run"), what="RUN_DIR")
    run_files.check_writable(path, what="RUN_DIR")
    assert gcs_env.list("probe/") == []


def test_the_metrics_log_on_gcs_is_rewritten_whole_and_trimmed_on_resume(gcs_env):
    url = gcs_env.url("metrics/run")
    log = names.MetricsLog(url, tensorboard=False)
    for step in (1, 2, 3):
        log.write(step, {names.REWARD: step / 10, names.KL: float("nan")})
        assert [r["step"] for r in names.read_jsonl(f"{url}/metrics.jsonl")] == list(range(1, step + 1))
    log.close()
    resumed = names.MetricsLog(url, resume_step=2, tensorboard=False)  # steps after 2 run again
    assert [r["step"] for r in names.read_jsonl(f"{url}/metrics.jsonl")] == [1, 2]
    resumed.write(3, {names.REWARD: 0.5})
    resumed.close()
    rows = names.read_jsonl(f"{url}/metrics.jsonl")
    assert rows == [{"step": 1, names.REWARD: 0.1, names.KL: None}, {"step": 2, names.REWARD: 0.2, names.KL: None},
                    {"step": 3, names.REWARD: 0.5}]
    assert gcs_env.list("metrics/") == ["metrics/run/metrics.jsonl"]  # no local file stood in for it


def _complete_dir(path: pathlib.Path) -> pathlib.Path:
    (path / "tokenizer").mkdir(parents=True)
    (path / "model.safetensors").write_bytes(os.urandom(3000))
    (path / "config.json").write_text('{"model_type": "qwen2"}')
    (path / "tokenizer" / "tokenizer.json").write_text("{}")
    bootstrap._mark_complete(path, preset="tiny")
    return path


def _files(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_tiny_model_published_to_a_gcs_run_dir_is_fetched_back_bit_for_bit(tmp_path, gcs_env):
    made = _complete_dir(tmp_path / "made")
    remote = run_files.run_path(gcs_env.url("publish/run/tiny_model"), what="RUN_DIR")
    assert not bootstrap.is_complete(remote)
    bootstrap.publish(made, remote)
    assert bootstrap.is_complete(remote)
    fetched = tmp_path / "elsewhere" / "tiny_model"
    assert bootstrap.fetch(remote, fetched)
    assert _files(fetched) == _files(made)


def test_nothing_is_fetched_from_a_run_dir_without_a_complete_model(tmp_path, gcs_env):
    remote = run_files.run_path(gcs_env.url("publish/empty/tiny_model"), what="RUN_DIR")
    (remote / "config.json").parent.mkdir(parents=True, exist_ok=True)
    (remote / "config.json").write_text("{}")  # an upload interrupted before its completion marker
    assert not bootstrap.fetch(remote, tmp_path / "tiny_model")
    assert not (tmp_path / "tiny_model").exists()
