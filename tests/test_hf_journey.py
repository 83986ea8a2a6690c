"""HF in, trained and evaluated, HF out, through the command lines only (issue 16), plus the export
guards: a model with a technique is refused without --allow_custom, and round-trips exactly with it."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
import transformers
from hf_journey_helpers import build_llava_dir, build_llava_json
from multiprocess_helpers import run_cli
from PIL import Image
from safetensors.numpy import load_file

from llvm_jax import config_utils, convert, predict, sampler
from llvm_jax.convert import core
from llvm_jax.data import vision


def _cli(module, *args):
  return run_cli(module, *args, timeout=900, check=False)


def _ok(module, *args):
  return run_cli(module, *args, timeout=900).stdout


def _hf_generate(hf_dir, image_path, question, max_new_tokens):
  processor = transformers.AutoProcessor.from_pretrained(hf_dir)
  model = transformers.AutoModelForImageTextToText.from_pretrained(hf_dir).eval()
  messages = [{"role": "user", "content": "<image>\n" + question}]
  prompt = processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  inputs = processor(text=prompt, images=Image.open(image_path), return_tensors="pt")
  out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
  new = out[0, inputs["input_ids"].shape[1] :].tolist()
  return new, processor.tokenizer.decode(new, skip_special_tokens=True).strip()


@pytest.mark.slow
def test_hf_dir_to_training_eval_export_and_generate(tmp_path):
  hf = build_llava_dir(str(tmp_path / "hf"))
  data = build_llava_json(str(tmp_path / "json"))
  tfds_dir, run, out = tmp_path / "tfds", tmp_path / "run", tmp_path / "export"
  _ok("llvm_jax.data.build", "llava_instruct", f"--data_dir={tfds_dir}", f"--manual_dir={data}")
  data_flags = [
      "--config.data.name=llava_instruct/default",
      f"--config.data.data_dir={tfds_dir}",
      "--config.eval_specs=test:exact_match,split=test,max_new_tokens=4",
  ]
  # A small learning rate keeps the answers non-trivial (not an immediate EOS) for the comparison below.
  _ok(
      "llvm_jax.main",
      f"--config=configs/hf.py:{hf}",
      f"--workdir={run}",
      *data_flags,
      "--config.train.total_steps=20",
      "--config.train.eval_every=10",
      "--config.optim.lr=1e-5",
      "--config.data.global_batch_size=8",
      "--config.data.seq_len=64",
  )
  assert json.load(open(run / "eval" / "test_step20_metrics.json"))["examples"] == 6
  printed = _ok(
      "llvm_jax.main",
      f"--config=configs/hf.py:dir={hf},task=eval",
      f"--workdir={run}",
      *data_flags,
      "--config.data.seq_len=64",
  )
  assert "eval test at step 20" in printed
  _ok("llvm_jax.convert", "to_hf", f"--checkpoint={run}", f"--out={out}", "--max_shard_mb=0.05")
  # Sharded safetensors with an index; the unused third ViT layer and post-layernorm survive unchanged.
  assert os.path.isfile(out / "model.safetensors.index.json")
  before = {convert.canonical_key(k): v for k, v in core.read_safetensors_dir(hf).items()}
  after = core.read_safetensors_dir(str(out))
  assert set(after) == set(before)
  for key in ("model.vision_tower.encoder.layers.2.mlp.fc1.weight", "model.vision_tower.post_layernorm.weight"):
    np.testing.assert_array_equal(after[key], before[key])
  for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json", "processor_config.json"):
    assert os.path.isfile(out / name), name
  # transformers' generate on the export == llvm_jax.predict on the run, on non-square (centre-cropped) images.
  # The word-level tokenizer decodes each token to one word, so equal texts are equal tokens.
  # The first question goes through the predict CLI (--checkpoint and --hf); the others through the same
  # Predictor in this process (same 8 CPU devices and XLA flags as the CLI's), sparing two ~8 s process
  # starts (jax, transformers and torch imports).
  answers = []
  predictor = None
  for k, question in ((0, "What color is the shape?"), (1, "Which shape is it?"), (2, "is it a the")):
    image = os.path.join(data, "images", f"test{k}.png")
    ids, text = _hf_generate(str(out), image, question, 6)
    if k == 0:
      answer = _ok(
          "llvm_jax.predict", f"--checkpoint={run}", f"--image={image}", f"--question={question}", "--max_new_tokens=6"
      ).strip()
      # predict --hf reads the export's processor, tokenizer and template too
      assert (
          _ok(
              "llvm_jax.predict", f"--hf={out}", f"--image={image}", f"--question={question}", "--max_new_tokens=6"
          ).strip()
          == text
      )
    else:
      predictor = predictor or predict.from_checkpoint(str(run))
      with open(image, "rb") as f:
        answer = predictor.answer(
            [f.read()], question, sampler.SamplingConfig(max_new_tokens=6), jax.random.key(0)
        ).strip()
    assert answer == text, (ids, text, answer)
    answers.append(answer)
  assert any(answers), "every answer is empty: the comparison would prove nothing"
  # An override contradicting the checkpoint is named field by field before the weight mismatch.
  failed = _cli(
      "llvm_jax.main",
      f"--config=configs/hf.py:{hf}",
      f"--workdir={tmp_path / 'bad'}",
      *data_flags,
      "--config.train.total_steps=1",
      "--config.model.vision.feature_layer=-1",
  )
  assert failed.returncode != 0
  assert "model.vision.feature_layer: config -1, checkpoint -2" in failed.stdout + failed.stderr


def _siglip_dir(path, processor):
  vision_cfg = transformers.SiglipVisionConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=7
  )
  text = transformers.Qwen2Config(
      vocab_size=40,
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
  )
  transformers.LlavaConfig(
      vision_config=vision_cfg,
      text_config=text,
      image_token_id=4,
      vision_feature_layer=-1,
      vision_feature_select_strategy="full",
  ).save_pretrained(path)
  processor.save_pretrained(path)


def test_tower_and_preprocessing_mismatch_is_an_error(tmp_path):
  _siglip_dir(tmp_path, transformers.CLIPImageProcessor(size={"shortest_edge": 28}, crop_size=28))
  settings = vision.processor_settings(str(tmp_path))
  spec = vision.make_vision_spec("clip", 28, settings["aspect_mode"], processor=str(tmp_path))
  with pytest.raises(ValueError, match="siglip vision tower"):
    vision.check_matches_tower(spec, "siglip")
  with pytest.raises(ValueError, match="data.image_size=32"):
    vision.make_vision_spec("clip", 32, processor=str(tmp_path))
  with pytest.raises(ValueError, match="data.vision='siglip'"):
    vision.check_matches_tower(vision.make_vision_spec("siglip", 28), "clip")


def test_checkpoint_differences_are_named_field_by_field(tmp_path):
  _siglip_dir(tmp_path, transformers.SiglipImageProcessor(size={"height": 28, "width": 28}))
  cfg = convert.llvm_config_from_hf(transformers.AutoConfig.from_pretrained(tmp_path))
  changed = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, feature_layer=-2))
  assert convert.checkpoint_differences(cfg, str(tmp_path)) == []
  assert convert.checkpoint_differences(changed, str(tmp_path)) == [
      "model.vision.feature_layer: config -2, checkpoint -1"
  ]


@pytest.mark.slow
def test_deepstack_export_is_refused_without_allow_custom_and_exact_with_it(tmp_path):
  hf = build_llava_dir(str(tmp_path / "hf"))
  base, _ = convert.from_hf(hf)
  cfg = config_utils.with_techniques(base.config, "deepstack")
  model = convert.LLVM(cfg)
  params = convert.init_params(model, jax.random.key(1))
  with pytest.raises(convert.CustomModelError, match="deepstack"):
    convert.to_hf(cfg, params, str(tmp_path / "refused"))
  # A DeepStack HF directory (written with allow_custom) -> a run -> HF again, through the CLIs.
  first = convert.to_hf(
      cfg, params, str(tmp_path / "ds_hf"), allow_custom=True, extra_state=convert.unused_hf_state(cfg, hf)
  )
  for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json"):
    os.link(os.path.join(hf, name), os.path.join(first, name))
  run = tmp_path / "run"
  _ok("llvm_jax.convert", "from_hf", f"--hf={first}", f"--out={run}")
  refused = _cli("llvm_jax.convert", "to_hf", f"--checkpoint={run}", f"--out={tmp_path / 'no'}")
  assert refused.returncode == 2 and "deepstack" in refused.stderr and "--allow_custom" in refused.stderr
  assert not os.path.exists(tmp_path / "no")
  second = tmp_path / "ds_hf2"
  _ok("llvm_jax.convert", "to_hf", f"--checkpoint={run}", f"--out={second}", "--allow_custom")
  a, b = load_file(os.path.join(first, "model.safetensors")), load_file(str(second / "model.safetensors"))
  assert set(a) == set(b)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  assert json.load(open(second / "llvm_jax_config.json")) == json.load(
      open(os.path.join(first, "llvm_jax_config.json"))
  )
  again, _ = convert.from_hf(str(second))
  assert again.config == cfg


def test_init_hf_with_a_technique_takes_every_checkpoint_weight_and_inits_only_the_techniques(tmp_path):
  from configs import hf as hf_config
  from llvm_jax import tree_utils
  from llvm_jax.models.llvm import LLVM
  from llvm_jax.train import trainer

  hf = build_llava_dir(str(tmp_path / "hf"))
  config = hf_config.get_config(hf)
  config.model.decoder.trol.update(enabled=True, gate_init="normal")
  model = LLVM(config_utils.model_config(config))
  mesh = trainer.mesh_from_config(config)
  setup, _ = trainer.build_setup(config, model, mesh)
  params = tree_utils.flatten(trainer.initial_params(config, setup))
  pretrained = tree_utils.flatten(convert.from_hf(hf)[1])
  fresh = sorted(k for k in params if k not in pretrained)
  assert fresh and all(k.startswith("decoder/trol_gate/") for k in fresh), fresh
  for key, value in pretrained.items():
    np.testing.assert_array_equal(np.asarray(params[key]), value, err_msg=key)
  assert np.abs(np.asarray(params["decoder/trol_gate/kernel"])).max() > 0  # the gate's own (normal) init
