"""Start from a `transformers` save_pretrained directory: model, tokenizer, chat template and image
preprocessing all come from it (LLaVA with CLIP / SigLIP, InternVL).

Run (fine-tune on a LLaVA-format dataset built with `python -m llvm_jax.data.build llava_instruct ...`):
  python -m llvm_jax.main --config=configs/hf.py:/path/to/llava-hf-dir --workdir=workdirs/ft \
      --config.data.name=llava_instruct/default --config.data.data_dir=/data/tfds
  python -m llvm_jax.main --config=configs/hf.py:dir=/path/to/dir,task=eval --workdir=workdirs/ft
  python -m llvm_jax.convert from_hf --hf=/path/to/dir --out=workdirs/base      # HF -> an Orbax run, then
  python -m llvm_jax.main --config=configs/hf.py:workdirs/base/hf --config.init_checkpoint=workdirs/base ...
  python -m llvm_jax.convert to_hf --checkpoint=workdirs/ft --out=/path/to/export  # and back to HF
Arg: the directory alone, or dir=DIR plus task=train|eval|demo, stage=pretrain|sft|sft_full|... .

Taken from the directory:
  model        convert.llvm_config_from_hf(config.json) (vocab size, vision.feature_layer, ...); the
               weights through config.init_hf.
  tokenizer    its tokenizer and chat template (config.tokenizer = DIR); config.image_token is the
               token of the checkpoint's image_token_id.
  images       preprocessor_config.json (or processor_config.json) through transformers' AutoImageProcessor: data.vision,
               data.image_size, data.aspect_mode (crop / pad / resize), mean/std, and the processor
               itself makes the pixels (data.image_processor = DIR).
A model whose preprocessing does not match its vision tower (SigLIP with CLIP mean/std) is an error
here. Command-line overrides that contradict the checkpoint are printed field by field when training
starts (`--config.model.*`), or fail naming the field (`--config.data.image_size` etc.).
"""

import os

from llvm_jax import config_utils


def get_config(arg=None):
  import transformers

  from llvm_jax import convert
  from llvm_jax.data import vision
  from llvm_jax.data.tokenizer import load_tokenizer

  if arg and "=" not in arg:
    arg = f"dir={arg}"
  args = config_utils.parse_arg(arg, dir="", task="train", stage="sft")
  if not args.dir:
    raise ValueError("configs/hf.py needs a directory: --config=configs/hf.py:/path/to/save_pretrained_dir")
  path = os.path.abspath(args.dir)
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise FileNotFoundError(f"{path} has no config.json (not a transformers save_pretrained directory)")
  model = convert.llvm_config_from_hf(transformers.AutoConfig.from_pretrained(path))
  config = config_utils.experiment(model, task=args.task, lock=False)
  config_utils.set_stage(config, args.stage)
  # A directory without weights (e.g. RUN/hf written by `python -m llvm_jax.convert from_hf`) gives the
  # settings only; the weights then come from --config.init_checkpoint=RUN.
  config.init_hf = path if any(f.endswith(".safetensors") for f in os.listdir(path)) else ""
  config.tokenizer = path
  tokenizer = load_tokenizer(path)  # without a chat template of its own, set config.data.chat_template
  if model.vision is not None:
    config.image_token = tokenizer.convert_ids_to_tokens(model.image_token_id)
    # Fails now, before any training, on e.g. a SigLIP tower with a CLIP image processor.
    config.data.update(vision.data_settings_from_dir(path, model.vision.kind, model.vision.image_size))
    if model.projector.kind == "pixel_shuffle_mlp":  # InternVL's image markers
      config.data.update(image_start="<img>", image_end="</img>")
  config.lock()
  return config
