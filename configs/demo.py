"""The embedded default: a tiny LLVM trained and evaluated on the bundled synthetic_vqa data.

A CLIP-style ViT (32 px, patch 8 -> 16 image tokens), an mlp2x_gelu projector and a 4-layer
Llama-style LLM with the built-in word-level tokenizer, trained from scratch on CPU in minutes
(synthetic_vqa/large: 40,000 training images, built on first use in a few seconds), then scored
(greedy generation, VQA accuracy) on the held-out test split, next to the chance level (the
accuracy of the best answer given the question alone, fitted on the training split).

Run:
  python -m llvm_jax.main --config=configs/demo.py --workdir=workdirs/demo
Arg: task=train|eval|demo (eval: the workdir's checkpoint with config.evals; demo: a forward pass and
     greedy generation on a random model), llm=llama|qwen2|phi3, vision=clip|siglip, steps, res, patch,
     lr, width and layers (LLM), dataset (a synthetic_vqa config: large, basic, detail, ...; see
     llvm_jax/data/builders.py), seq (tokens per row), vision_lr / projector_lr (learning-rate multipliers; vision_lr=none
     freezes the ViT, projector_lr=none the projector), batch,
     technique=baseline|trol|phantom|deepstack|pmod|all_four (or names joined by '+', e.g. trol+pmod;
     each with its paper's settings, fitted to the model's depth; data.deepstack_grid follows the model),
     attention=cpu_flash|xla|blocked|cudnn|splash (decoder and ViT; cpu_flash, the default, is the fused
     C++ kernel for XLA:CPU, built on first use: on a GPU or TPU pass another, e.g. attention=xla),
     dense=auto|cpu|xla (weight gradients of the dense layers; cpu: the C++ kernel for XLA:CPU; auto, the
     default: cpu with attention=cpu_flash, else xla).
Every technique block is also in the config, off: e.g. --config.model.decoder.trol.enabled=True
--config.model.decoder.trol.layers='(0,1)', --config.model.deepstack.enabled=True.
"""

from llvm_jax import config_utils
from llvm_jax.data.tokenizer import tiny_vocabulary


def _dense_for(attention: str) -> str:
  """The C++ kernels go together: on XLA:CPU (cpu_flash) the weight gradients too, elsewhere XLA's."""
  return "cpu" if attention == "cpu_flash" else "xla"


def get_config(arg=None):
  args = config_utils.parse_arg(
      arg,
      task="train",
      llm="llama",
      vision="clip",
      steps=3500,
      res=32,
      patch=8,
      lr=1e-3,
      width=64,
      vision_lr="0.1",
      projector_lr="1.0",
      batch=16,
      layers=4,
      technique="baseline",
      dataset="synthetic_vqa/large",
      seq=96,
      attention="cpu_flash",
      dense="auto",
  )
  vocab = tiny_vocabulary()
  model = config_utils.tiny_llvm(
      vocab_size=len(vocab),
      image_token_id=vocab["<image>"],
      image_size=args.res,
      patch_size=args.patch,
      family=args.llm,
      vision_kind=args.vision,
      embed_dim=args.width,
      num_layers=args.layers,
      vision_width=48,
      vision_depth=2,
  )
  model = config_utils.with_techniques(model, args.technique)
  model = config_utils.with_attention(model, args.attention)
  model = config_utils.with_dense(model, args.dense if args.dense != "auto" else _dense_for(args.attention))
  config = config_utils.experiment(model, task=args.task, lock=False)
  config.data.update(
      name=args.dataset,
      data_dir="workdirs/tfds",
      build_if_missing=True,
      split="train",
      seq_len=args.seq,
      global_batch_size=args.batch,
      vision=args.vision,
      image_size=args.res,
      # p-MoD's MoD layers are sized for one image a row (config_utils.finalize rejects packing).
      packing=model.decoder.pmod is None,
      max_images=3 if model.decoder.pmod is None else 1,
  )
  # The ViT starts from random weights. At the LLM's learning rate it collapses to image-independent
  # features before the LLM learns to read them (accuracy near chance); frozen (like LLaVA-1.5's
  # SFT) or at a tenth of the rate, its random features carry the image and the LLM learns to use them.
  lr_mult = lambda value: None if value == "none" else float(value)
  config.optim.trainable = [
      ("vision/.*", lr_mult(args.vision_lr)),
      ("projector/.*", lr_mult(args.projector_lr)),
      (".*", 1.0),
  ]
  config.optim.update(lr=args.lr, warmup_steps=30, min_lr_ratio=0.05, weight_decay=0.01, grad_clip=1.0)
  config.train.update(total_steps=args.steps, log_every=25, checkpoint_every=1000, eval_every=0)
  config.evals.test = dict(type="vqa", split="test", max_new_tokens=6, baseline_split="train")
  config.lock()
  return config_utils.finalize(config)
