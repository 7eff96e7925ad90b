"""The demo policy shipped in tspo_jax/data/demo_policy (`make sft-demo SHIP=1`) still matches the world, texts and
tokenizer it was trained for, and is intact; when the demo world changes, these fail until it is trained again."""

import json

from tspo_jax.models.qwen2 import Qwen2Config
from tspo_jax.rollout.tokenizer import load_tokenizer
from tspo_jax.training import bootstrap, demo_policy

SHIPPED = demo_policy.DIRECTORY


def _recipe():
    return json.loads((SHIPPED / demo_policy.RECIPE).read_text())


def test_the_shipped_policy_was_trained_for_todays_demo_world_and_texts():
    assert _recipe()["world_fingerprint"] == demo_policy.world_fingerprint(), (
        "the demo world, its texts or its demonstrations changed since the shipped policy was trained: run "
        "`make sft-demo SHIP=1` and commit tspo_jax/data/demo_policy")


def test_the_shipped_tokenizer_is_the_one_the_demo_world_builds(tmp_path):
    built = bootstrap.demo_tokenizer(tmp_path / "tokenizer")
    assert json.loads((SHIPPED / "tokenizer.json").read_text())["model"] == \
        json.loads((built / "tokenizer.json").read_text())["model"]
    shipped, fresh = load_tokenizer(SHIPPED), load_tokenizer(built)
    assert shipped.get_vocab() == fresh.get_vocab() and shipped.chat_template == fresh.chat_template


def test_the_shipped_weights_and_config_are_intact():
    recipe = _recipe()
    assert demo_policy.file_sha256(SHIPPED / "model.safetensors") == recipe["weights_sha256"]
    assert demo_policy.file_sha256(SHIPPED / "tokenizer.json") == recipe["tokenizer_sha256"]
    cfg, preset = Qwen2Config.from_hf(SHIPPED), Qwen2Config.preset("demo")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
        assert getattr(cfg, field) == getattr(preset, field), field
