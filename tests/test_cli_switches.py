"""Techniques and evals switched from the command line; the console's progress bar (issue 16)."""

import json

import pytest
from multiprocess_helpers import run_cli

from configs import demo, internvl, llava, paper
from llvm_jax import config_utils
from llvm_jax.models.config import LLVMConfig, PmodConfig
from llvm_jax.train import metrics as metrics_lib


# -- config level (fast) ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "get_config,arg",
    [
        (demo.get_config, "layers=2"),
        (llava.get_config, "size=tiny"),
        (internvl.get_config, "size=tiny"),
        (paper.get_config, "model=llava15_7b"),
    ],
)
@pytest.mark.parametrize("technique", ["baseline", "trol", "phantom", "deepstack", "pmod", "trol+pmod", "all_four"])
def test_technique_arg_on_every_model_config(get_config, arg, technique):
  config = get_config(f"{arg},technique={technique}")
  model = config_utils.model_config(config)
  on = set(config_utils.technique_names(technique))
  assert (model.decoder.trol is not None) == ("trol" in on)
  assert (model.decoder.phantom is not None) == ("phantom" in on)
  assert (model.decoder.pmod is not None) == ("pmod" in on)
  assert (model.deepstack is not None) == ("deepstack" in on)
  # The data side follows the model.
  grid = config.data.deepstack_grid
  assert (None if grid is None else tuple(grid)) == (model.deepstack.num_crops if model.deepstack else None)


def test_every_block_present_and_off_is_none():
  config = demo.get_config()
  for block in (
      config.model.decoder.trol,
      config.model.decoder.phantom,
      config.model.decoder.pmod,
      config.model.deepstack,
  ):
    assert block.enabled is False
  model = config_utils.model_config(config)
  assert model.decoder.trol is model.decoder.phantom is model.decoder.pmod is model.deepstack is None
  # One way to be off: a disabled block is None, wherever it comes from.
  import dataclasses

  assert dataclasses.replace(model.decoder, pmod=PmodConfig(enabled=False)) == model.decoder
  assert LLVMConfig.from_dict(model.to_dict()) == model


def test_small_models_get_fitted_deepstack_and_big_ones_the_papers():
  for layers in (1, 2, 3, 4, 5):
    model = config_utils.model_config(demo.get_config(f"layers={layers},technique=deepstack"))
    assert model.deepstack.llm_layers[-1] < layers
  assert config_utils.model_config(paper.get_config("model=deepstack_l_7b")).deepstack.llm_layers == (1, 2, 3, 4)


def test_an_enabled_block_that_does_not_fit_names_the_fields():
  config = demo.get_config("layers=2")
  config.model.deepstack.update(enabled=True, start=1, num_crops=(2, 2))
  with pytest.raises(ValueError, match="model.deepstack.start"):
    config_utils.model_config(config)


def test_deepstack_grid_that_contradicts_the_model_is_named():
  config = demo.get_config("layers=2,technique=deepstack")
  config.data.deepstack_grid = (3, 3)
  with pytest.raises(ValueError, match="data.deepstack_grid=.*model.deepstack.num_crops"):
    config_utils.finalize(config)


def test_eval_specs_add_and_update_evals():
  config = demo.get_config()
  config.eval_specs = "val:vqa,split=test,max_examples=5;test,max_examples=7,baseline_split=''"
  config_utils.finalize(config)
  assert config.evals.val.to_dict() == {"type": "vqa", "split": "test", "max_examples": 5}
  assert config.evals.test.max_examples == 7 and config.evals.test.baseline_split == ""
  config.eval_specs = "new,max_examples=1"
  with pytest.raises(ValueError, match="needs a type"):
    config_utils.finalize(config)
  config.eval_specs = "-val"
  assert sorted(config_utils.finalize(config).evals) == ["test"]


def test_progress_line_has_step_mean_loss_rate_and_eta(tmp_path, capsys):
  writer = metrics_lib.MetricsWriter(str(tmp_path), total_steps=100)
  writer.progress(25, {"loss": 2.5, "tokens_per_second": 12345.0, "step_time": 0.5})
  writer.close()
  line = capsys.readouterr().out.strip()
  assert line.startswith("step 25/100") and "avg loss 2.5" in line and "tokens/s 12,345" in line
  assert "2 steps/s" in line and "ETA 0:38" in line and "step_time" not in line


# -- through the command line: the four techniques train 2 steps -------------------------------------
@pytest.fixture(scope="module")
def techniques_run(tmp_path_factory):
  # One process switches all four techniques on, each the way a user would (the config arg or its block's
  # flags): one model compile instead of one per technique. Evals from the command line: test_eval_predict.
  workdir = tmp_path_factory.mktemp("techniques")
  result = run_cli(
      "llvm_jax.main",
      "--config=configs/demo.py:steps=2,res=32,patch=16,layers=2,batch=8,technique=phantom",
      f"--workdir={workdir}",
      "--config.data.name=synthetic_vqa/tiny",
      f"--config.data.data_dir={tmp_path_factory.mktemp('tfds')}",
      "--config.train.log_every=1",
      "--config.evals.test.baseline_split=",
      "--config.model.decoder.trol.enabled=True",
      "--config.model.decoder.trol.layers=(1,)",
      "--config.model.decoder.pmod.enabled=True",
      "--config.data.packing=False",  # p-MoD's kept length is sized for unpacked rows
      "--config.model.deepstack.enabled=True",  # data.deepstack_grid follows
      "--config.eval_specs=-test",  # no eval: the four techniques' sampler is the costliest compile here
  )
  return result, json.loads((workdir / "config.json").read_text())


@pytest.mark.parametrize("name", ["trol", "phantom", "pmod", "deepstack"])
@pytest.mark.slow
def test_each_technique_trains_from_the_command_line(techniques_run, name):
  result, saved = techniques_run
  model = LLVMConfig.from_dict(saved["model"])
  block = model.deepstack if name == "deepstack" else getattr(model.decoder, name)
  assert block is not None
  if name == "trol":
    assert model.decoder.trol.layers == (1,)
  if name == "deepstack":
    assert tuple(saved["data"]["deepstack_grid"]) == model.deepstack.num_crops
  assert "step 2/2" in result.stdout and "eval " not in result.stdout


# -- predict --stream prints the same text as the returned answer ------------------------------------
def test_streamed_text_equals_the_answer(monkeypatch):
  import types

  import numpy as np

  from llvm_jax import predict, sampler

  pieces = {10: " red", 11: " triangle", 12: " ", 13: "s", 2: "</s>"}

  class Tokenizer:
    eos_token_id = 2

    def decode(self, ids, skip_special_tokens=True):
      return "".join(pieces[i] for i in ids if not (skip_special_tokens and i == 2))

  generated = [10, 11, 12, 13, 12, 2]

  def fake_sample(model, params, inputs, sampling, key=None, stream=None):
    for step, token in enumerate(generated):
      stream(np.int32(step), np.asarray([token]))
    return types.SimpleNamespace(tokens=np.asarray([generated]), lengths=np.asarray([len(generated) - 1]))

  monkeypatch.setattr(sampler, "sample", fake_sample)
  predictor = object.__new__(predict.Predictor)
  predictor.tokenizer, predictor.model, predictor.params = Tokenizer(), None, None
  monkeypatch.setattr(predict.Predictor, "inputs", lambda self, images, question: {})
  streamed = []
  answer = predictor.answer([], "?", sampler.SamplingConfig(max_new_tokens=6), stream=streamed.append)
  assert answer == "red triangle s" and "".join(streamed) == answer and streamed[0] == "red"


def test_pmod_with_packed_rows_is_rejected_and_the_demo_unpacks_for_it():
  assert demo.get_config("technique=pmod").data.packing is False
  assert demo.get_config("technique=trol").data.packing is True
  config = demo.get_config()
  config.model.decoder.pmod.enabled = True
  with pytest.raises(ValueError, match="p-MoD .* needs data.packing=False"):
    config_utils.finalize(config)
