"""Paper-scale configs: parameter counts against `transformers` models built on the meta device
(no memory) plus each technique's exact additions, and the analytic cost report."""

import functools

import pytest

from configs import paper
from llvm_jax import config_utils, convert, cost
from llvm_jax.models import phantom, pmod, trol

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@functools.cache
def hf_used_params(backbone: str) -> int:
  """Parameters of the transformers model of `backbone`, less those its vision feature layer never
  reads (LLaVA takes CLIP's penultimate layer: the last layer and post_layernorm are dead weight)."""
  cfg = paper.MODELS[backbone]()
  with torch.device("meta"):
    model = transformers.AutoModelForImageTextToText.from_config(convert.hf_config_of(cfg))
  depth, used = cfg.vision.depth, cfg.vision.num_layers_used
  unused = tuple(f"encoder.layers.{i}." for i in range(used, depth))
  if used < depth:
    unused += ("post_layernorm.",)
  return sum(p.numel() for name, p in model.named_parameters() if not any(u in name for u in unused))


def technique_additions(cfg) -> int:
  dec = cfg.decoder
  added = 0
  if dec.trol is not None:
    added += trol.num_gates(dec) * (dec.embed_dim + 1)
  if dec.phantom is not None:
    added += dec.num_layers * phantom.added_params_per_layer(dec)
  if dec.pmod is not None:
    added += len(pmod.layer_ratios(dec)) * (dec.embed_dim + 1)
  return added  # DeepStack adds no parameters


BACKBONE = {
    name: (
        "llava15_7b"
        if "7b" in name and ("llava" in name or "deepstack" in name)
        else f"internvl2_{name.split('_')[-1]}"
    )
    for name in paper.MODELS
}


@pytest.mark.parametrize("name", sorted(paper.MODELS))
def test_parameter_count_matches_transformers_plus_technique(name):
  cfg = paper.MODELS[name]()
  assert cost.param_count(cfg) == hf_used_params(BACKBONE[name]) + technique_additions(cfg)


def test_known_sizes_and_additions():
  # InternVL2-1B is 0.94B with its 0.3B ViT; LLaVA-1.5-7B is 7.06B in transformers.
  assert hf_used_params("internvl2_0.5b") == 802_276_096
  assert technique_additions(paper.MODELS["phantom_0.5b"]()) == 24 * (12 * 64 * 64 + 2 * 64 + 2)
  assert technique_additions(paper.MODELS["trol_7b"]()) == 32 * 4097


def test_cost_report_of_paper_models():
  base = cost.report(paper.MODELS["llava15_7b"](), text_tokens=64)
  assert base["context_tokens"] == 576 + 64
  # fp16 K and V of 32 layers x 640 tokens x 4096, plus the int32 segment ids / positions.
  assert base["kv_cache_bytes"] == 2 * 32 * 640 * 4096 * 4 + 2 * 640 * 4 + 4  # fp32 cache (default dtype)
  pm = cost.report(paper.MODELS["pmod_llava15_7b"](), text_tokens=64)
  assert 0.5 < pm["prefill_flops"] / base["prefill_flops"] < 0.7
  assert pm["kv_cache_bytes"] < 0.7 * base["kv_cache_bytes"]
  ds = cost.report(paper.MODELS["deepstack_l_7b"](), text_tokens=64)
  assert ds["context_tokens"] == base["context_tokens"]  # the crops add no context
  assert ds["kv_cache_bytes"] == base["kv_cache_bytes"]
  tr = cost.report(paper.MODELS["trol_7b"](), text_tokens=64)
  ref = cost.report(paper.MODELS["internvl2_7b"](), text_tokens=64)
  decoder_ratio = tr["prefill_flops_parts"]["decoder"] / ref["prefill_flops_parts"]["decoder"]
  assert 1.8 < decoder_ratio < 2.0  # every layer twice; the head once
  assert tr["kv_cache_bytes"] == 2 * ref["kv_cache_bytes"] - 2 * 320 * 4 - 4  # pass-2 K/V per layer
  ph = cost.report(paper.MODELS["phantom_7b"](), text_tokens=64)
  assert ph["prefill_flops"] > ref["prefill_flops"] and ph["kv_cache_bytes"] > ref["kv_cache_bytes"]


def test_paper_config_files_build():
  from configs.paper import get_config

  config = get_config("model=phantom_0.5b,stage=po2")
  assert config.train.loss == "po" and config.data.vision == "internvl"
  assert config_utils.model_config(config).decoder.phantom is not None
  with pytest.raises(ValueError, match="model='trol_9b' unknown"):
    get_config("model=trol_9b")


@pytest.mark.parametrize("technique", ["baseline", "trol", "phantom", "deepstack", "pmod", "all_four"])
def test_bench_1b_is_internvl2_1b_plus_technique(technique):
  from configs import bench_1b

  cfg = config_utils.model_config(bench_1b.get_config(f"technique={technique}"))
  assert cost.param_count(cfg) == hf_used_params("internvl2_0.5b") + technique_additions(cfg)
  assert (cfg.decoder.dtype, cfg.decoder.param_dtype, cfg.vision.dtype, cfg.projector.dtype) == (
      "bfloat16",
      "float32",
      "bfloat16",
      "bfloat16",
  )
  names = {
      "trol": cfg.decoder.trol,
      "phantom": cfg.decoder.phantom,
      "deepstack": cfg.deepstack,
      "pmod": cfg.decoder.pmod,
  }
  on = {n for n, block in names.items() if block is not None}
  assert on == (set(names) if technique == "all_four" else set() if technique == "baseline" else {technique})


def test_with_techniques_rejects_unknown_names():
  with pytest.raises(ValueError, match="unknown technique.*'tro'"):
    config_utils.with_techniques(paper.MODELS["internvl2_0.5b"](), "tro+pmod")


def test_gpu_bench_script_times_and_writes_the_table(tmp_path, monkeypatch):
  """The GPU benchmark's own code path, on the tiny twin of the 1B config. One variant: the techniques
  are config values to the script (their train steps are compiled by the technique and CLI tests)."""
  import json
  import sys

  sys.path.insert(0, "experiments")
  import gpu_bench

  from configs import bench_1b

  out, raw = tmp_path / "gpu.md", tmp_path / "gpu.json"
  monkeypatch.setattr(
      sys,
      "argv",
      [
          "gpu_bench.py",
          "--size=tiny",
          "--batch=8",  # divisible by the 8 test devices
          "--seq_len=64",
          "--remat=none",  # remat is a config value, not a code path of the script: skip its compile cost
          "--steps=1",
          "--techniques=trol",
          "--threefry_kernel=false",  # the test worker's jax setting as it is (the flag is in jit cache keys)
          f"--out={out}",
          f"--json={raw}",
      ],
  )
  gpu_bench.main()
  [result] = json.loads(raw.read_text())
  assert "error" not in result and result["step_time_s"] > 0 and result["tokens_per_second"] > 0
  assert result["init_s"] > 0 and result["last_loss"] < result["first_loss"]  # the same batch, four steps
  cfg = config_utils.model_config(bench_1b.get_config("technique=trol,size=tiny"))
  assert result["params"] == cost.param_count(cfg)
  table = out.read_text()
  assert "| trol |" in table and "--size=tiny" in table and "threefry_kernel=false" in table
