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

DeepStack high-resolution crops: the (aspect-processed) image is resized to
(g_h * S, g_w * S) and cut into g_h x g_w crops of S x S, row-major; for InternVL each tile is
cropped that way.
"""

from __future__ import annotations

import dataclasses

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

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"vision kind must be one of {KINDS}, got {self.kind!r}")
    if self.aspect_mode not in ASPECT_MODES:
      raise ValueError(f"aspect_mode must be one of {ASPECT_MODES}, got {self.aspect_mode!r}")
    if (self.aspect_mode == "tile") != (self.kind == "internvl"):
      raise ValueError("aspect_mode 'tile' is InternVL's (and InternVL only tiles)")
    if self.deepstack_grid is not None and (len(self.deepstack_grid) != 2 or min(self.deepstack_grid) < 1):
      raise ValueError(f"deepstack_grid must be (g_h, g_w) >= 1, got {self.deepstack_grid}")


def make_vision_spec(
    kind: str,
    image_size: int,
    aspect_mode: str | None = None,
    max_tiles: int = 6,
    use_thumbnail: bool = True,
    deepstack_grid=None,
) -> VisionSpec:
  """A VisionSpec with the tower's mean/std and default aspect mode ('internvit' = 'internvl')."""
  kind = {"internvit": "internvl"}.get(kind, kind)
  if kind not in _DEFAULTS:
    raise ValueError(f"vision kind must be one of {KINDS}, got {kind!r}")
  mean, std, default_mode = _DEFAULTS[kind]
  grid = None if deepstack_grid is None else tuple(int(g) for g in deepstack_grid)
  return VisionSpec(kind, int(image_size), aspect_mode or default_mode, mean, std, int(max_tiles), bool(use_thumbnail), grid)


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


def dynamic_preprocess(image: Image.Image, min_num=1, max_num=12, image_size=448, use_thumbnail=False) -> list[Image.Image]:
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
    box = ((i % cols) * image_size, (i // cols) * image_size, ((i % cols) + 1) * image_size, ((i // cols) + 1) * image_size)
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


def preprocess_image(img: Image.Image, spec: VisionSpec) -> tuple[np.ndarray, np.ndarray | None]:
  """One RGB image -> (slots (n, S, S, 3) float32, hires (n, g_h*g_w, S, S, 3) or None).

  n = 1 except for InternVL, where it is the number of tiles (+ thumbnail).
  """
  size = spec.image_size
  if spec.kind == "internvl":
    tiles = dynamic_preprocess(img, 1, spec.max_tiles, size, spec.use_thumbnail)
    slots = np.stack([normalize(t, spec.mean, spec.std) for t in tiles])
    hires = None
    if spec.deepstack_grid is not None:
      hires = np.stack([deepstack_crops(t, spec.deepstack_grid, size, spec.mean, spec.std) for t in tiles])
    return slots, hires
  src = _aspect(img, spec)
  if spec.aspect_mode == "crop":
    base = resize_short_center_crop(img, size)
  else:
    base = src.resize((size, size), Image.BICUBIC)
  slots = normalize(base, spec.mean, spec.std)[None]
  hires = None
  if spec.deepstack_grid is not None:
    hires = deepstack_crops(src, spec.deepstack_grid, size, spec.mean, spec.std)[None]
  return slots, hires


def num_tiles(width: int, height: int, spec: VisionSpec) -> int:
  """How many slots `preprocess_image` produces for an image of this size."""
  if spec.kind != "internvl":
    return 1
  cols, rows = tile_grid(width, height, 1, spec.max_tiles, spec.image_size)
  return cols * rows + (1 if spec.use_thumbnail and cols * rows != 1 else 0)
