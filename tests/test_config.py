"""gin in T5X's conventions: the shipped configs build, flags override files, and every bad binding is refused
before any work starts with a message naming it and where it was written."""

import re
import subprocess
import sys

import gin
import pytest

from tspo_jax.train import load_experiment
from tspo_jax.training import gin_config
from tspo_jax.training.gin_config import GinConfigError, split_gin_flags

ROOT = gin_config.REPO_ROOT
TINY = "configs/experiments/tiny_cpu.gin"
SEARCH_R1_MACROS = ["--gin.MODEL_DIR='/ckpt/qwen'", "--gin.RUN_DIR='/tmp/run'",
                    "--gin.TRAIN_FILES=['/data/train.parquet']", "--gin.EVAL_FILES=['/data/test.parquet']",
                    "--gin.RetrievalSpec.addresses=['10.0.0.2:50051']"]


def _experiment(*argv):
    flags, rest = split_gin_flags(list(argv))
    assert rest == []
    return load_experiment(flags)


def test_the_main_job_config_builds_with_nothing_to_fill_in():
    exp = _experiment(f"--gin_file={TINY}")
    assert exp.run_dir == "runs/tiny_cpu" and exp.data.demo
    assert exp.model.checkpoint == "tspo_jax/data/demo_policy"  # the shipped SFT warm start
    assert exp.algorithm.name == "tspo"
    assert exp.loss.kl == "low_var_kl" and exp.loss.kl_coef == 0.001


@pytest.mark.parametrize("size", ["3b", "7b"])
def test_search_r1_runs_carry_search_r1_hyperparameters(size):
    exp = _experiment(f"--gin_file=configs/experiments/search_r1_qwen2_5_{size}.gin", *SEARCH_R1_MACROS)
    assert (exp.prompts_per_step, exp.samples_per_prompt) == (512, 5)
    assert exp.optimizer.learning_rate == 1e-6 and exp.optimizer.warmup_steps > 0
    assert (exp.loss.kl, exp.loss.kl_coef, exp.loss.clip_low, exp.loss.clip_high) == ("low_var_kl", 0.001, 0.2, 0.2)
    assert exp.rollout.agent.max_turns == 4 and exp.rollout.agent.max_turn_tokens == 500
    assert exp.retrieval.top_k == 3
    assert exp.model.expect_preset == size and exp.model.dtype == "bfloat16"
    assert exp.data.train_files == ("/data/train.parquet",)


@pytest.mark.parametrize("algorithm", ["tspo", "grpo", "gtpo"])
def test_an_algorithm_file_switches_the_estimator_and_binds_its_options(tmp_path, algorithm):
    experiment = tmp_path / "exp.gin"
    experiment.write_text(f"include '{TINY}'\ninclude 'configs/algorithms/{algorithm}.gin'\n")
    exp = _experiment(f"--gin_file={experiment}")
    assert exp.algorithm.name == algorithm
    if algorithm == "gtpo":
        assert gin.query_parameter("gtpo_advantages.gamma") == 0.9


def test_command_line_bindings_override_files_in_order():
    exp = _experiment(f"--gin_file={TINY}", "--gin.train.num_steps=3", "--gin_bindings",
                      "train.seed = 7\nAgentConfig.max_turns = 1", "--gin.train.seed=9")
    assert (exp.num_steps, exp.seed, exp.rollout.agent.max_turns) == (3, 9, 1)


def test_includes_resolve_on_added_search_paths(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "short.gin").write_text("train.num_steps = 2\n")
    experiment = tmp_path / "exp.gin"
    experiment.write_text(f"include '{TINY}'\ninclude 'mine/short.gin'\n")
    exp = _experiment(f"--gin_file={experiment}", f"--gin_search_path={tmp_path}")
    assert exp.num_steps == 2


def test_a_mistyped_parameter_in_a_file_is_named_with_file_and_line(tmp_path):
    experiment = tmp_path / "exp.gin"
    experiment.write_text(f"include '{TINY}'\n\ntrain.num_stpes = 5\n")
    with pytest.raises(GinConfigError) as failure:
        _experiment(f"--gin_file={experiment}")
    message = str(failure.value)
    assert "num_stpes" in message and f'"{experiment}", line 3' in message


def test_an_unknown_configurable_on_the_command_line_is_named_with_its_flag():
    with pytest.raises(GinConfigError, match=r"--gin\.AgentConfg\.max_turns.*AgentConfg"):
        _experiment(f"--gin_file={TINY}", "--gin.AgentConfg.max_turns=2")


def test_a_value_of_the_wrong_type_is_named_with_where_it_was_set(tmp_path):
    with pytest.raises(GinConfigError, match=r"train\.num_steps = 'ten': expected an int \[--gin\.train\.num_steps\]"):
        _experiment(f"--gin_file={TINY}", "--gin.train.num_steps='ten'")
    experiment = tmp_path / "exp.gin"
    experiment.write_text(f"include '{TINY}'\nLossConfig.kl_coef = 'small'\n")
    with pytest.raises(GinConfigError, match=re.escape(f'LossConfig.kl_coef = \'small\': expected a number [file "{experiment}", line 2]')):
        _experiment(f"--gin_file={experiment}")


def test_an_unset_required_macro_names_itself_and_the_flag_that_sets_it():
    with pytest.raises(GinConfigError) as failure:
        _experiment("--gin_file=configs/experiments/search_r1_qwen2_5_3b.gin", *SEARCH_R1_MACROS[1:])
    message = str(failure.value)
    assert "MODEL_DIR is %gin.REQUIRED" in message and "--gin.MODEL_DIR=VALUE" in message
    assert "qwen2_5_3b.gin" in message  # where the REQUIRED was written


def test_an_unquoted_string_gets_a_hint_about_gin_quoting():
    with pytest.raises(GinConfigError, match="gin strings are quoted"):
        _experiment(f"--gin_file={TINY}", "--gin.RUN_DIR=/tmp/x")


def test_values_that_do_not_fit_together_are_refused_naming_the_binding():
    with pytest.raises(GinConfigError, match=r"UpdateSpec\.mini_batches=3 does not divide the 40 trajectories"):
        _experiment(f"--gin_file={TINY}", "--gin.UpdateSpec.mini_batches=3")
    with pytest.raises(GinConfigError, match=r"DataSpec\.train_files is empty"):
        _experiment(f"--gin_file={TINY}", "--gin.DataSpec.demo=False")


def test_the_config_and_operative_config_are_written_for_the_record(tmp_path):
    _experiment(f"--gin_file={TINY}", "--gin.train.num_steps=3")
    full = gin_config.write_config(tmp_path)
    operative = gin_config.write_config(tmp_path, operative=True)
    assert "train.num_steps = 3" in full.read_text()
    assert "AgentConfig.max_turns = 3" in operative.read_text()


def test_the_cli_refuses_a_bad_binding_before_doing_any_work(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "tspo_jax.train", f"--gin_file={TINY}", f"--gin.RUN_DIR='{run_dir}'",
         "--gin.OptimizerSpec.learning_rte=1e-3"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "learning_rte" in result.stderr and "--gin.OptimizerSpec.learning_rte" in result.stderr
    assert not run_dir.exists()  # nothing was made: no data, no model, no service


@pytest.mark.parametrize("binding, culprit", [
    ("--gin.RUN_DIR='s3://bucket/run'", r"train.run_dir \(RUN_DIR\) = 's3://bucket/run': only local paths and gs://"),
    ("--gin.MODEL_DIR='gs://bucket/Qwen2.5-3B'", r"ModelSpec.checkpoint = 'gs://bucket/Qwen2.5-3B' is a URL"),
    ("--gin.TRAIN_FILES=['gs://bucket/train.parquet']", r"DataSpec.train_files = 'gs://bucket/train.parquet' is a URL"),
])
def test_a_url_where_a_local_path_is_needed_is_refused_naming_the_binding(binding, culprit):
    with pytest.raises(GinConfigError, match=culprit):
        _experiment("--gin_file=configs/experiments/search_r1_qwen2_5_3b.gin", *SEARCH_R1_MACROS, binding)


def test_a_gcs_run_dir_is_accepted_as_it_is():
    exp = _experiment("--gin_file=configs/experiments/search_r1_qwen2_5_3b.gin", *SEARCH_R1_MACROS,
                      "--gin.RUN_DIR='gs://bucket/runs/tspo_3b'")
    assert exp.run_dir == "gs://bucket/runs/tspo_3b"
