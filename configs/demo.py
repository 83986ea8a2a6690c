"""The embedded default: a tiny LLVM trained and evaluated on the bundled synthetic_vqa data.

A CLIP-style ViT (32 px, patch 8 -> 16 image tokens), an mlp2x_gelu projector and a 4-layer
Llama-style LLM with the built-in word-level tokenizer, trained from scratch on CPU in minutes,
then scored (greedy generation, VQA accuracy) on the held-out test split.

Run:
  python -m llvm_jax.main --config=configs/demo.py --workdir=workdirs/demo
Arg: task=train|demo (demo: a forward pass and greedy generation on a random model),
     llm=llama|qwen2|phi3, vision=clip|siglip, steps=<int>.
"""

from llvm_jax import config_utils
from llvm_jax.data.tokenizer import tiny_vocabulary


def get_config(arg=None):
  args = config_utils.parse_arg(arg, task="train", llm="llama", vision="clip", steps=1500, res=32, patch=16,
                                lr=3e-3, width=96, vision_lr=1.0)
  vocab = tiny_vocabulary()
  model = config_utils.tiny_llvm(
      vocab_size=len(vocab), image_token_id=vocab["<image>"], image_size=args.res, patch_size=args.patch,
      family=args.llm, vision_kind=args.vision, embed_dim=args.width, num_layers=4, vision_width=64, vision_depth=2,
  )
  config = config_utils.experiment(model, task=args.task, lock=False)
  config.data.update(
      name="synthetic_vqa/small", data_dir="workdirs/tfds", build_if_missing=True, split="train",
      seq_len=96, global_batch_size=32, vision=args.vision, image_size=args.res, packing=True, max_images=3,
  )
  # The image pathway starts from scratch too; a larger learning rate there helps the LLM find it.
  config.optim.trainable = [("vision/.*", args.vision_lr), ("projector/.*", args.vision_lr), (".*", 1.0)]
  config.optim.update(lr=args.lr, warmup_steps=30, min_lr_ratio=0.05, weight_decay=0.01, grad_clip=1.0)
  config.train.update(total_steps=args.steps, log_every=25, checkpoint_every=200, eval_every=0)
  config.evals.test = dict(type="vqa", split="test", max_new_tokens=6, baseline_split="train")
  config.lock()
  return config
