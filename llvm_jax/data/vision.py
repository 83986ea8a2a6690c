"""Image preprocessing per vision tower (PIL in, float32 NHWC out), matching the reference
processors:

  clip     LLaVA-1.5 / CLIPImageProcessor: mean (0.48145466, 0.4578275, 0.40821073),
           std (0.26862954, 0.26130258, 0.27577711). aspect 'pad' (LLaVA-1.5 default): expand to
           a square filled with the mean colour, then resize (bicubic); 'crop': resize the short
           side then centre-crop (plain CLIP); 'resize': squash to the square.
  siglip   SiglipImageProcessor: mean = std = 0.5, bicubic resize to the square ('resize').
  internvl InternVL: ImageNet mean (0.485, 0.456, 0.406) / std (0.229, 0.224, 0.225),
           `dynamic_preprocess(min_num=1, max_num=N, use_thumbnail=True)` tiling into
           image_size tiles plus a thumbnail ('tile').

From a `transformers` image processor (`VisionSpec.processor`, a `save_pretrained` directory holding
`preprocessor_config.json`): size, crop, pad and mean/std are read from the processor's attributes
(`processor_settings`) and the base slot of CLIP / SigLIP towers is the processor's own output, so
training, evaluation and `predict` see the pixels transformers' `AutoProcessor` produces.

DeepStack high-resolution crops (`deepstack_grid_mode`):
  fixed   (default) the (aspect-processed) image is resized to (g_h * S, g_w * S) and cut into
          g_h x g_w crops of S x S, row-major; for InternVL each tile is cropped that way.
  aspect  each image gets its own grid (a, b), a * b = g_h * g_w (the model's number of groups),
          whose a / b best matches the image's height / width (`aspect_grid`; ties -> the fixed
          grid); the image itself (not padded or centre-cropped) is resized to (a * S, b * S) and
          cut into a x b crops. The grids go to the model as `hires_grid` (`deepstack_grids`).
          InternVL tiles are square, so they keep the most square grid.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

KINDS = ("clip", "siglip", "internvl")
ASPECT_MODES = ("pad", "crop", "resize", "tile")
DEEPSTACK_GRID_MODES = ("fixed", "aspect")
_DEFAULTS = {
    "clip": (CLIP_MEAN, CLIP_STD, "pad"),
    "siglip": (SIGLIP_MEAN, SIGLIP_STD, "resize"),
    "internvl": (IMAGENET_MEAN, IMAGENET_STD, "tile"),
}


@dataclasses.dataclass(frozen=True)
class VisionSpec:
  kind: str = "clip"
  image_size: int = 336
  aspect_mode: str = "pad"
  mean: tuple[float, float, float] = CLIP_MEAN
  std: tuple[float, float, float] = CLIP_STD
  max_tiles: int = 6  # InternVL dynamic_preprocess max_num
  use_thumbnail: bool = True
  deepstack_grid: tuple[int, int] | None = None  # (g_h, g_w)
  processor: str = ""  # an HF image-processor directory whose own output is the base slot ('' = built in)
  # 'fixed': every image is cut by deepstack_grid; 'aspect': each by its own grid (`aspect_grid`).
  deepstack_grid_mode: str = "fixed"

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"vision kind must be one of {KINDS}, got {self.kind!r}")
    if self.aspect_mode not in ASPECT_MODES:
      raise ValueError(f"aspect_mode must be one of {ASPECT_MODES}, got {self.aspect_mode!r}")
    if (self.aspect_mode == "tile") != (self.kind == "internvl"):
      raise ValueError("aspect_mode 'tile' is InternVL's (and InternVL only tiles)")
    if self.deepstack_grid is not None and (len(self.deepstack_grid) != 2 or min(self.deepstack_grid) < 1):
      raise ValueError(f"deepstack_grid must be (g_h, g_w) >= 1, got {self.deepstack_grid}")
    if self.deepstack_grid_mode not in DEEPSTACK_GRID_MODES:
      raise ValueError(f"deepstack_grid_mode must be one of {DEEPSTACK_GRID_MODES}, got {self.deepstack_grid_mode!r}")


def make_vision_spec(
    kind: str,
    image_size: int,
    aspect_mode: str | None = None,
    max_tiles: int = 6,
    use_thumbnail: bool = True,
    deepstack_grid=None,
    processor: str = "",
    deepstack_grid_mode: str = "fixed",
) -> VisionSpec:
  """A VisionSpec with the tower's mean/std and default aspect mode ('internvit' = 'internvl').

  With `processor` (an HF image-processor directory), image size, aspect mode and mean/std are the
  processor's (`processor_settings`); an `image_size` / `aspect_mode` contradicting it raises.
  """
  kind = {"internvit": "internvl"}.get(kind, kind)
  if kind not in _DEFAULTS:
    raise ValueError(f"vision kind must be one of {KINDS}, got {kind!r}")
  mean, std, default_mode = _DEFAULTS[kind]
  grid = None if deepstack_grid is None else tuple(int(g) for g in deepstack_grid)
  if processor:
    hf = processor_settings(processor)
    if hf["kind"] != kind:
      raise ValueError(f"data.vision={kind!r} but the image processor in {processor} is {hf['kind']!r} preprocessing")
    theirs = {"image_size": hf["image_size"], "aspect_mode": hf["aspect_mode"]}
    ours = {"image_size": int(image_size), "aspect_mode": aspect_mode or hf["aspect_mode"]}
    diff = [f"data.{k}={ours[k]!r} (processor: {theirs[k]!r})" for k in theirs if ours[k] != theirs[k]]
    if diff:
      raise ValueError(f"data settings contradict the image processor in {processor}: " + ", ".join(diff))
    mean, std, default_mode = hf["mean"], hf["std"], hf["aspect_mode"]
  return VisionSpec(
      kind,
      int(image_size),
      aspect_mode or default_mode,
      mean,
      std,
      int(max_tiles),
      bool(use_thumbnail),
      grid,
      processor,
      deepstack_grid_mode,
  )


# Image-processor classes of transformers -> our preprocessing kind.
_PROCESSOR_KINDS = {
    "CLIPImageProcessor": "clip",
    "LlavaImageProcessor": "clip",
    "SiglipImageProcessor": "siglip",
    "GotOcr2ImageProcessor": "internvl",
}


@functools.lru_cache(maxsize=8)
def load_image_processor(path: str):
  """transformers' `AutoImageProcessor.from_pretrained(path)`, once per process."""
  import transformers  # lazy: a heavy import, only paid when an HF model is actually used

  return transformers.AutoImageProcessor.from_pretrained(path)


def _side(size: Any) -> int:
  """An HF `size` / `crop_size` (dict or int) -> the square side it describes."""
  if isinstance(size, int):
    return size
  size = {k: v for k, v in dict(size).items() if v is not None}  # SizeDicts carry every key, unset ones None
  if "shortest_edge" in size:
    return int(size["shortest_edge"])
  if size.get("height") != size.get("width"):
    raise ValueError(f"non-square image processor size {size} is not supported")
  return int(size["height"])


def processor_settings(path: str) -> dict[str, Any]:
  """What an HF image processor does, in our terms: kind, image_size, aspect_mode, mean, std
  (and `max_tiles` / `use_thumbnail` for InternVL's tiling)."""
  proc = load_image_processor(path)
  name = type(proc).__name__.removesuffix("Fast").removesuffix("Pil")
  kind = _PROCESSOR_KINDS.get(name)
  if kind is None:
    raise ValueError(f"image processor {name} in {path} unsupported; supported: {sorted(_PROCESSOR_KINDS)}")
  out: dict[str, Any] = {
      "kind": kind,
      "mean": tuple(float(v) for v in proc.image_mean),
      "std": tuple(float(v) for v in proc.image_std),
  }
  if kind == "internvl":
    out.update(
        image_size=_side(proc.size),
        aspect_mode="tile",
        max_tiles=int(getattr(proc, "max_patches", 12)),
        use_thumbnail=True,
    )
  elif getattr(proc, "do_pad", False):
    out.update(
        image_size=_side(proc.crop_size if getattr(proc, "do_center_crop", False) else proc.size), aspect_mode="pad"
    )
  elif getattr(proc, "do_center_crop", False):
    if _side(proc.size) != _side(proc.crop_size):
      raise ValueError(
          f"{path}: resize to {proc.size} then crop to {proc.crop_size} is not supported (equal sides only)"
      )
    out.update(image_size=_side(proc.crop_size), aspect_mode="crop")
  else:
    out.update(image_size=_side(proc.size), aspect_mode="resize")
  if not (proc.do_resize and proc.do_rescale and proc.do_normalize):
    raise ValueError(f"{path}: do_resize / do_rescale / do_normalize must all be true")
  return out


def check_matches_tower(spec: VisionSpec, tower_kind: str) -> None:
  """Raises if `spec` is not the preprocessing the tower was trained with (e.g. SigLIP fed CLIP
  normalisation): kind, mean and std must be the tower's."""
  expected = {"clip": "clip", "siglip": "siglip", "internvit": "internvl"}[tower_kind]
  mean, std, _ = _DEFAULTS[expected]
  problems = []
  if spec.kind != expected:
    problems.append(f"data.vision={spec.kind!r} (the tower needs {expected!r})")
  if not (np.allclose(spec.mean, mean, atol=1e-3) and np.allclose(spec.std, std, atol=1e-3)):
    problems.append(f"mean/std {spec.mean}/{spec.std} (the tower's: {mean}/{std})")
  if problems:
    raise ValueError(f"image preprocessing does not match the {tower_kind} vision tower: " + "; ".join(problems))


def expand2square(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
  """LLaVA's expand2square: pad the short side (centred) with `background`."""
  width, height = img.size
  if width == height:
    return img
  if width > height:
    result = Image.new(img.mode, (width, width), background)
    result.paste(img, (0, (width - height) // 2))
    return result
  result = Image.new(img.mode, (height, height), background)
  result.paste(img, ((height - width) // 2, 0))
  return result


def resize_short_center_crop(img: Image.Image, size: int) -> Image.Image:
  """CLIPImageProcessor: resize the shortest edge to `size` (bicubic), centre-crop size x size."""
  w, h = img.size
  short, long = (w, h) if w <= h else (h, w)
  new_long = int(size * long / short)
  new_w, new_h = (size, new_long) if w <= h else (new_long, size)
  img = img.resize((new_w, new_h), Image.BICUBIC)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return img.crop((left, top, left + size, top + size))


def find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
  """InternVL's find_closest_aspect_ratio (verbatim logic)."""
  best_ratio_diff = float("inf")
  best_ratio = (1, 1)
  area = width * height
  for ratio in target_ratios:
    target_aspect_ratio = ratio[0] / ratio[1]
    ratio_diff = abs(aspect_ratio - target_aspect_ratio)
    if ratio_diff < best_ratio_diff:
      best_ratio_diff = ratio_diff
      best_ratio = ratio
    elif ratio_diff == best_ratio_diff:
      if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
        best_ratio = ratio
  return best_ratio


def _target_ratios(min_num: int, max_num: int) -> list[tuple[int, int]]:
  target_ratios = set(
      (i, j)
      for n in range(min_num, max_num + 1)
      for i in range(1, n + 1)
      for j in range(1, n + 1)
      if min_num <= i * j <= max_num
  )
  return sorted(target_ratios, key=lambda x: x[0] * x[1])


def tile_grid(width: int, height: int, min_num: int = 1, max_num: int = 12, image_size: int = 448) -> tuple[int, int]:
  """InternVL's chosen (columns, rows) of tiles for an image of width x height."""
  return find_closest_aspect_ratio(width / height, _target_ratios(min_num, max_num), width, height, image_size)


def dynamic_preprocess(
    image: Image.Image, min_num=1, max_num=12, image_size=448, use_thumbnail=False
) -> list[Image.Image]:
  """InternVL's dynamic_preprocess: tiles of image_size (row-major) + optional thumbnail."""
  orig_width, orig_height = image.size
  target_aspect_ratio = tile_grid(orig_width, orig_height, min_num, max_num, image_size)
  target_width = image_size * target_aspect_ratio[0]
  target_height = image_size * target_aspect_ratio[1]
  blocks = target_aspect_ratio[0] * target_aspect_ratio[1]
  resized_img = image.resize((target_width, target_height))
  cols = target_width // image_size
  processed = []
  for i in range(blocks):
    box = (
        (i % cols) * image_size,
        (i // cols) * image_size,
        ((i % cols) + 1) * image_size,
        ((i // cols) + 1) * image_size,
    )
    processed.append(resized_img.crop(box))
  if use_thumbnail and len(processed) != 1:
    processed.append(image.resize((image_size, image_size)))
  return processed


def normalize(img: Image.Image, mean, std) -> np.ndarray:
  """PIL RGB -> float32 (H, W, 3): (x / 255 - mean) / std."""
  x = np.asarray(img.convert("RGB"), dtype=np.float32) * np.float32(1.0 / 255.0)
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def _aspect(img: Image.Image, spec: VisionSpec) -> Image.Image:
  """The image before the final resize: padded to a square for 'pad', centre-cropped to a square
  for 'crop', unchanged for 'resize'."""
  if spec.aspect_mode == "pad":
    return expand2square(img, tuple(int(x * 255) for x in spec.mean))
  if spec.aspect_mode == "crop":
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s))
  return img


def deepstack_crops(img: Image.Image, grid: tuple[int, int], size: int, mean, std) -> np.ndarray:
  """Resize to (g_h*size, g_w*size) and cut g_h x g_w crops of size x size, row-major:
  float32 (g_h*g_w, size, size, 3)."""
  g_h, g_w = grid
  big = normalize(img.resize((g_w * size, g_h * size), Image.BICUBIC), mean, std)
  crops = big.reshape(g_h, size, g_w, size, 3).transpose(0, 2, 1, 3, 4)
  return np.ascontiguousarray(crops.reshape(g_h * g_w, size, size, 3))


def aspect_grid(width: int, height: int, grid: tuple[int, int]) -> tuple[int, int]:
  """The grid (a, b), a * b = g_h * g_w, whose a / b is closest to height / width (in log ratio);
  ties go to `grid`, then to the most square grid, then to the smaller a."""
  g = grid[0] * grid[1]
  target = np.log(height / width)

  def cost(ab):
    a, b = ab
    return (round(abs(np.log(a / b) - target), 9), ab != tuple(grid), abs(np.log(a / b)), a)

  return min(((a, g // a) for a in range(1, g + 1) if g % a == 0), key=cost)


def _image_grid(img: Image.Image, spec: VisionSpec) -> tuple[int, int]:
  """The crop grid of one (non-tiled) image or tile under the spec's deepstack_grid_mode."""
  if spec.deepstack_grid_mode == "aspect":
    return aspect_grid(img.size[0], img.size[1], spec.deepstack_grid)
  return spec.deepstack_grid


def deepstack_grids(img: Image.Image, spec: VisionSpec) -> np.ndarray | None:
  """int32 (n, 2): the crop grid of each of `preprocess_image`'s n slots with deepstack_grid_mode
  'aspect' (the model's `hires_grid`); None otherwise (every slot uses deepstack_grid)."""
  if spec.deepstack_grid is None or spec.deepstack_grid_mode != "aspect":
    return None
  if spec.kind == "internvl":  # square tiles (and thumbnail)
    grid = aspect_grid(spec.image_size, spec.image_size, spec.deepstack_grid)
    return np.tile(np.asarray(grid, np.int32), (num_tiles(img.size[0], img.size[1], spec), 1))
  return np.asarray([_image_grid(img, spec)], np.int32)


def preprocess_image(img: Image.Image, spec: VisionSpec) -> tuple[np.ndarray, np.ndarray | None]:
  """One RGB image -> (slots (n, S, S, 3) float32, hires (n, g_h*g_w, S, S, 3) or None).

  n = 1 except for InternVL, where it is the number of tiles (+ thumbnail). With deepstack_grid_mode
  'aspect' the crops of slot i follow the grid `deepstack_grids(img, spec)[i]`.
  """
  size = spec.image_size
  if spec.kind == "internvl":
    tiles = dynamic_preprocess(img, 1, spec.max_tiles, size, spec.use_thumbnail)
    slots = np.stack([normalize(t, spec.mean, spec.std) for t in tiles])
    hires = None
    if spec.deepstack_grid is not None:
      hires = np.stack([deepstack_crops(t, _image_grid(t, spec), size, spec.mean, spec.std) for t in tiles])
    return slots, hires
  src = _aspect(img, spec)
  if spec.processor:  # transformers' own pixels (NCHW) -> HWC
    base = load_image_processor(spec.processor)(images=img.convert("RGB"), return_tensors="np")["pixel_values"]
    slots = np.ascontiguousarray(np.asarray(base, np.float32)[0].transpose(1, 2, 0))[None]
  elif spec.aspect_mode == "crop":
    base = resize_short_center_crop(img, size)
  else:
    base = src.resize((size, size), Image.BICUBIC)
  if not spec.processor:
    slots = normalize(base, spec.mean, spec.std)[None]
  hires = None
  if spec.deepstack_grid is not None and spec.deepstack_grid_mode == "aspect":
    hires = deepstack_crops(img, _image_grid(img, spec), size, spec.mean, spec.std)[None]  # not padded
  elif spec.deepstack_grid is not None:
    hires = deepstack_crops(src, spec.deepstack_grid, size, spec.mean, spec.std)[None]
  return slots, hires


def num_tiles(width: int, height: int, spec: VisionSpec) -> int:
  """How many slots `preprocess_image` produces for an image of this size."""
  if spec.kind != "internvl":
    return 1
  cols, rows = tile_grid(width, height, 1, spec.max_tiles, spec.image_size)
  return cols * rows + (1 if spec.use_thumbnail and cols * rows != 1 else 0)


def data_settings_from_dir(path: str, tower_kind: str, tower_image_size: int) -> dict[str, Any]:
  """The data block's image settings for a model saved in `path` (a save_pretrained directory):
  `vision`, `image_size` and, when it holds an image processor, `image_processor` (= path),
  `aspect_mode` and InternVL's `max_tiles`. Raises if they do not match the tower (`check_matches_tower`)."""
  import os

  kind = {"internvit": "internvl"}.get(tower_kind, tower_kind)
  out: dict[str, Any] = {"vision": kind, "image_size": int(tower_image_size), "image_processor": ""}
  # transformers 5 nests the image processor in processor_config.json; older saves use preprocessor_config.json.
  if any(os.path.isfile(os.path.join(path, f)) for f in ("preprocessor_config.json", "processor_config.json")):
    hf = processor_settings(path)
    out.update(image_processor=path, image_size=hf["image_size"], aspect_mode=hf["aspect_mode"])
    if kind == "internvl":
      out["max_tiles"] = hf["max_tiles"]
  spec = make_vision_spec(
      kind, out["image_size"], out.get("aspect_mode"), out.get("max_tiles", 6), processor=out["image_processor"]
  )
  check_matches_tower(spec, tower_kind)
  return out
