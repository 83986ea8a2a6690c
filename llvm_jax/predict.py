"""Answer a question about images with a trained run or an HF directory.

  python -m llvm_jax.predict --checkpoint=WORKDIR_OR_STEP_DIR --image=X.png --question="What is it?"
  python -m llvm_jax.predict --hf=HF_DIR --image=X.png --question="..." [--chat_template=vicuna_v1]

From a checkpoint, only the params are read (never the optimiser state), with the run's own config
(saved beside them), onto a mesh over whatever devices exist (`--mesh_shape`, default all devices on
'fsdp'); LoRA adapters are merged. Image preprocessing and the prompt follow the run's data config,
exactly as in evaluation.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags

from llvm_jax import config_utils, convert, host, sampler, sharding
from llvm_jax.data import records, vision
from llvm_jax.data.config import default_data_config, resolve
from llvm_jax.data.pipeline import vision_spec_from_config
from llvm_jax.data.text import ChatEncoder
from llvm_jax.data.tokenizer import build_tiny_tokenizer, load_tokenizer
from llvm_jax.models.llvm import LLVM
from llvm_jax.train import checkpoint as ckpt
from llvm_jax.train import trainer


@dataclasses.dataclass
class Predictor:
  model: LLVM
  params: Any
  tokenizer: Any
  data_config: ml_collections.ConfigDict
  image_token: str = "<image>"

  def __post_init__(self):
    settings = resolve(self.data_config)
    self.encoder = ChatEncoder(
        self.tokenizer,
        image_token=self.image_token,
        num_image_tokens=self.model.config.tokens_per_image,
        image_start=settings.image_start,
        image_end=settings.image_end,
        system_prompt=settings.system_prompt,
    )
    self.vision_spec = vision_spec_from_config(self.data_config)

  def inputs(self, images: Sequence[bytes], question: str) -> dict[str, np.ndarray]:
    """The model inputs (batch of one) for encoded `images` and a question (markers optional)."""
    markers = question.count(records.IMAGE_MARKER)
    if markers == 0 and images:
      question = (records.IMAGE_MARKER + "\n") * len(images) + question
    elif markers != len(images):
      raise ValueError(f"the question has {markers} {records.IMAGE_MARKER} markers for {len(images)} images")
    if images and self.model.config.vision is None:
      raise ValueError("images were given but the model has no vision tower")
    slots, hires, tiles, grids = [], [], [], []
    for k, data in enumerate(images):
      try:
        img = records.decode_image(data)
        s, h = vision.preprocess_image(img, self.vision_spec)
      except records.SampleError as e:
        raise ValueError(f"image {k}: {e}") from None
      slots.append(s)
      hires.append(h)
      grids.append(vision.deepstack_grids(img, self.vision_spec))
      tiles.append(len(s))
    enc, _ = self.encoder.encode_prompt([(records.USER, question), (records.ASSISTANT, "")], tiles)
    batch = sampler.pad_prompts([enc.ids])
    if slots:
      batch["images"] = np.concatenate(slots)[None]
      batch["image_mask"] = np.ones((1, sum(tiles)), bool)
      if hires[0] is not None:
        batch["hires_images"] = np.concatenate(hires)[None]
      if grids[0] is not None:  # data.deepstack_grid_mode 'aspect'
        batch["hires_grid"] = np.concatenate(grids)[None]
    return batch

  def answer(
      self,
      images: Sequence[bytes],
      question: str,
      sampling: sampler.SamplingConfig | None = None,
      key: jax.Array | None = None,
      stream: Callable[[str], None] | None = None,
  ) -> str:
    """The generated answer; `stream` receives each new piece of text as it is generated."""
    sampling = sampling or sampler.SamplingConfig(max_new_tokens=64)
    if sampling.eos_id is None:
      sampling = dataclasses.replace(sampling, eos_id=self.tokenizer.eos_token_id)
    on_token = None
    if stream is not None:
      emitted: list[int] = []
      shown = [""]  # the text streamed so far

      def on_token(step, tokens):
        del step
        token = int(np.asarray(tokens)[0])
        if token == sampling.eos_id:
          return
        emitted.append(token)
        # The returned answer is stripped, so the stream is too: no leading space (' triangle'), and
        # trailing whitespace is held back until text follows it.
        text = self.tokenizer.decode(emitted, skip_special_tokens=True).strip()
        if text.startswith(shown[0]) and len(text) > len(shown[0]):
          stream(text[len(shown[0]) :])
          shown[0] = text

    out = sampler.sample(self.model, self.params, self.inputs(images, question), sampling, key, stream=on_token)
    ids = np.asarray(out.tokens)[0, : int(out.lengths[0])].tolist()
    return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


def mesh_for_inference(mesh_shape: Sequence[int] | None = None) -> jax.sharding.Mesh:
  return sharding.make_mesh(tuple(mesh_shape) if mesh_shape else (1, -1, 1))


def from_checkpoint(checkpoint: str, mesh_shape: Sequence[int] | None = None, step: int | None = None) -> Predictor:
  """A Predictor from a training run's checkpoint (params only; the run's config and tokenizer)."""
  config, workdir, step = ckpt.read_config(checkpoint, step)
  model = LLVM(config_utils.model_config(config))
  params, _ = trainer.restore_for_inference(config, model, mesh_for_inference(mesh_shape), checkpoint, step)
  tokenizer_path = config.tokenizer
  if tokenizer_path == "tiny":
    tokenizer_path = os.path.join(workdir, "tokenizer")
    if not os.path.exists(tokenizer_path):
      build_tiny_tokenizer(tokenizer_path)
  tokenizer = load_tokenizer(tokenizer_path, resolve(config.data).chat_template or None)
  return Predictor(model, params, tokenizer, config.data, config.image_token)


def from_hf(path: str, chat_template: str | None = None, image_token: str = "<image>") -> Predictor:
  """A Predictor from a `save_pretrained` directory (model, tokenizer and its chat template)."""
  model, params = convert.from_hf(path)
  if model.config.vision is None:
    raise ValueError(f"{path} holds a text-only model; predict needs an LLVM")
  data = default_data_config()
  data.update(chat_template=chat_template or "")
  # The directory's image processor (size, crop, pad, mean/std), as configs/hf.py uses it for training.
  data.update(vision.data_settings_from_dir(path, model.config.vision.kind, model.config.vision.image_size))
  tokenizer = load_tokenizer(path, chat_template)
  if tokenizer.chat_template is None:
    raise ValueError(f"the tokenizer in {path} has no chat template; pass --chat_template (e.g. vicuna_v1)")
  return Predictor(model, params, tokenizer, data, image_token)


_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A training workdir, its checkpoints/ folder or one step's folder."
)
_HF = flags.DEFINE_string("hf", None, "A transformers save_pretrained directory (instead of --checkpoint).")
_IMAGE = flags.DEFINE_multi_string("image", [], "Image file(s), one per <image> marker.")
_QUESTION = flags.DEFINE_string("question", None, "The question.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_MESH = flags.DEFINE_list("mesh_shape", None, "('data','fsdp','tensor') sizes, -1 = the rest (default 1,-1,1).")
_CHAT_TEMPLATE = flags.DEFINE_string("chat_template", None, "With --hf: a template name or Jinja string.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed for sampling.")
_STREAM = flags.DEFINE_bool("stream", False, "Print the answer token by token as it is generated.")


def main(argv) -> None:
  del argv
  host.tune_host_process()
  if bool(_CHECKPOINT.value) == bool(_HF.value):
    raise app.UsageError("give exactly one of --checkpoint and --hf")
  if _QUESTION.value is None:
    raise app.UsageError("--question is required")
  images = []
  for path in _IMAGE.value:
    if not os.path.isfile(path):
      raise app.UsageError(f"--image {path} is not a file")
    with open(path, "rb") as f:
      images.append(f.read())
  if _CHECKPOINT.value:
    mesh = [int(s) for s in _MESH.value] if _MESH.value else None
    predictor = from_checkpoint(_CHECKPOINT.value, mesh, _STEP.value)
  else:
    predictor = from_hf(_HF.value, _CHAT_TEMPLATE.value)
  sampling = sampler.SamplingConfig(
      max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value
  )
  stream = (lambda text: print(text, end="", flush=True)) if _STREAM.value else None
  answer = predictor.answer(images, _QUESTION.value, sampling, jax.random.key(_SEED.value), stream)
  print("" if _STREAM.value else answer)


if __name__ == "__main__":
  app.run(main)
