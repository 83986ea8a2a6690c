"""The entry point: configs load, typos fail by name, the demo task runs end to end."""

import json

import pytest
from multiprocess_helpers import run_cli

from configs import demo, internvl, llava
from llvm_jax import config_utils


def _run(*args):
  return run_cli("llvm_jax.main", *args, timeout=300, check=False)


def test_demo_runs_and_cache_matches_full_sequence(tmp_path):
  result = _run("--config=configs/demo.py:task=demo", f"--workdir={tmp_path}")
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads((tmp_path / "demo.json").read_text())
  model = config_utils.model_config(demo.get_config("task=demo"))
  assert report["image_tokens"] == model.tokens_per_image and len(report["generated"]) == 8
  assert report["max_abs_diff_cached_vs_full_logits"] < 1e-5
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["model"]["decoder"]["family"] == "llama"


def test_override_typo_fails_with_the_key_named(tmp_path):
  result = _run("--config=configs/demo.py:task=demo", f"--workdir={tmp_path}", "--config.model.decoder.num_layrs=3")
  assert result.returncode != 0
  assert "num_layrs" in result.stderr and "num_layers" in result.stderr


def test_config_arg_typo_fails_with_the_key_named():
  with pytest.raises(ValueError, match="unknown config arg 'lm'"):
    llava.get_config("lm=qwen2")


@pytest.mark.parametrize(
    "get_config,arg",
    [
        (demo.get_config, None),
        (llava.get_config, "size=tiny,llm=qwen2,vision=siglip"),
        (llava.get_config, "size=7b"),
        (internvl.get_config, "size=1b"),
    ],
)
def test_configs_build_model_configs(get_config, arg):
  config = get_config(arg)
  model = config_utils.model_config(config)
  assert model.tokens_per_image > 0
  with pytest.raises(AttributeError):
    config.modle = 1  # locked


def test_seven_b_shapes():
  model = config_utils.model_config(llava.get_config("size=7b"))
  assert model.tokens_per_image == 576
  assert model.vision.num_layers_used == 23
  assert config_utils.model_config(internvl.get_config("size=1b")).tokens_per_image == 256
