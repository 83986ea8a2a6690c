"""Vision preprocessing: CLIP pad / SigLIP resize / InternVL tiling / DeepStack crops."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from llvm_jax.data import vision as V


def _solid(color, size):
  return Image.new("RGB", size, color)


def _norm(rgb, mean, std):
  return (np.asarray(rgb, np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def test_clip_pad_expands_with_mean_colour_then_resizes():
  spec = V.make_vision_spec("clip", 24)
  assert spec.aspect_mode == "pad" and spec.mean == V.CLIP_MEAN and spec.std == V.CLIP_STD
  img = _solid((255, 0, 0), (48, 16))  # wide: padded above and below
  slots, hires = V.preprocess_image(img, spec)
  assert slots.shape == (1, 24, 24, 3) and slots.dtype == np.float32 and hires is None
  pad = tuple(int(x * 255) for x in V.CLIP_MEAN)
  np.testing.assert_allclose(slots[0, 0, 12], _norm(pad, V.CLIP_MEAN, V.CLIP_STD), atol=1e-5)  # top rows: mean colour
  np.testing.assert_allclose(
      slots[0, 12, 12], _norm((255, 0, 0), V.CLIP_MEAN, V.CLIP_STD), atol=1e-5
  )  # centre: the image
  # same as LLaVA's expand2square + bicubic resize + (x/255 - mean)/std
  ref = np.asarray(V.expand2square(img, pad).resize((24, 24), Image.BICUBIC), np.float32) / 255.0
  np.testing.assert_allclose(slots[0], (ref - np.float32(V.CLIP_MEAN)) / np.float32(V.CLIP_STD), atol=1e-5)


def test_clip_crop_mode_centre_crops():
  spec = V.make_vision_spec("clip", 8, aspect_mode="crop")
  img = Image.new("RGB", (24, 8))
  img.paste((0, 255, 0), (8, 0, 16, 8))  # green centre square, black sides
  slots, _ = V.preprocess_image(img, spec)
  np.testing.assert_allclose(slots[0, 4, 4], _norm((0, 255, 0), V.CLIP_MEAN, V.CLIP_STD), atol=1e-5)


def test_siglip_resize_and_normalisation():
  spec = V.make_vision_spec("siglip", 16)
  assert spec.aspect_mode == "resize"
  slots, _ = V.preprocess_image(_solid((255, 0, 51), (40, 10)), spec)
  assert slots.shape == (1, 16, 16, 3)
  np.testing.assert_allclose(slots[0, 0, 0], [1.0, -1.0, 51 / 255 * 2 - 1], atol=1e-5)
  np.testing.assert_allclose(slots[0], slots[0, 0, 0] * np.ones((16, 16, 3)), atol=1e-5)  # no padding


@pytest.mark.parametrize(
    "size,max_num,grid",
    [
        ((448, 448), 6, (1, 1)),
        ((896, 448), 6, (2, 1)),
        ((448, 1344), 6, (1, 3)),
        ((1000, 500), 12, (2, 1)),
        ((1600, 400), 6, (4, 1)),
        ((100, 100), 4, (1, 1)),
        ((900, 600), 6, (3, 2)),
    ],
)
def test_internvl_tile_grid(size, max_num, grid):
  assert V.tile_grid(size[0], size[1], 1, max_num, 448) == grid


def test_internvl_dynamic_tiles_and_thumbnail():
  spec = V.make_vision_spec("internvl", 16, max_tiles=6)
  assert spec.aspect_mode == "tile" and spec.mean == V.IMAGENET_MEAN
  img = Image.new("RGB", (64, 32))
  img.paste((255, 0, 0), (0, 0, 32, 32))
  img.paste((0, 0, 255), (32, 0, 64, 32))
  slots, _ = V.preprocess_image(img, spec)
  # 2:1 -> 2x1 tiles (left red, right blue) + a thumbnail of the whole image
  assert slots.shape == (3, 16, 16, 3)
  assert V.num_tiles(64, 32, spec) == 3
  np.testing.assert_allclose(slots[0, 8, 8], _norm((255, 0, 0), V.IMAGENET_MEAN, V.IMAGENET_STD), atol=1e-5)
  np.testing.assert_allclose(slots[1, 8, 8], _norm((0, 0, 255), V.IMAGENET_MEAN, V.IMAGENET_STD), atol=1e-5)
  np.testing.assert_allclose(slots[2, 8, 2], _norm((255, 0, 0), V.IMAGENET_MEAN, V.IMAGENET_STD), atol=1e-5)
  np.testing.assert_allclose(slots[2, 8, 13], _norm((0, 0, 255), V.IMAGENET_MEAN, V.IMAGENET_STD), atol=1e-5)
  # a square image is one tile and no thumbnail
  assert V.preprocess_image(_solid((1, 2, 3), (20, 20)), spec)[0].shape == (1, 16, 16, 3)
  assert V.num_tiles(20, 20, spec) == 1
  # without thumbnail
  no_thumb = V.make_vision_spec("internvl", 16, max_tiles=6, use_thumbnail=False)
  assert V.preprocess_image(img, no_thumb)[0].shape == (2, 16, 16, 3)


def _quadrants(size=(40, 40)):
  w, h = size
  img = Image.new("RGB", size)
  colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
  for k, c in enumerate(colors):
    r, q = divmod(k, 2)
    img.paste(c, (q * w // 2, r * h // 2, (q + 1) * w // 2, (r + 1) * h // 2))
  return img, colors


def test_deepstack_crops_row_major():
  img, colors = _quadrants()
  spec = V.make_vision_spec("siglip", 8, deepstack_grid=(2, 2))
  slots, hires = V.preprocess_image(img, spec)
  assert slots.shape == (1, 8, 8, 3) and hires.shape == (1, 4, 8, 8, 3)
  for k, c in enumerate(colors):
    np.testing.assert_allclose(hires[0, k, 4, 4], _norm(c, V.SIGLIP_MEAN, V.SIGLIP_STD), atol=1e-5)
  # exactly the (g_h*S, g_w*S) resize cut into S x S crops
  big = V.normalize(img.resize((16, 16), Image.BICUBIC), V.SIGLIP_MEAN, V.SIGLIP_STD)
  np.testing.assert_allclose(hires[0, 1], big[0:8, 8:16], atol=1e-6)
  np.testing.assert_allclose(hires[0, 2], big[8:16, 0:8], atol=1e-6)


def test_deepstack_non_square_grid_and_internvl_tiles():
  img, colors = _quadrants((40, 40))
  hires = V.preprocess_image(img, V.make_vision_spec("clip", 8, deepstack_grid=(1, 2)))[1]
  assert hires.shape == (1, 2, 8, 8, 3)
  # crop 0 = left half (red over blue), crop 1 = right half (green over yellow)
  np.testing.assert_allclose(hires[0, 0, 1, 4], _norm(colors[0], V.CLIP_MEAN, V.CLIP_STD), atol=1e-5)
  np.testing.assert_allclose(hires[0, 1, 6, 4], _norm(colors[3], V.CLIP_MEAN, V.CLIP_STD), atol=1e-5)
  slots, hires = V.preprocess_image(
      Image.new("RGB", (64, 32)), V.make_vision_spec("internvl", 8, deepstack_grid=(2, 2))
  )
  assert slots.shape == (3, 8, 8, 3) and hires.shape == (3, 4, 8, 8, 3)


def test_deepstack_aspect_grid_per_image():
  # The grid (a, b), a*b = 4, closest to h/w; ties (h/w = 1/2: (1, 4) and (2, 2) equally far) -> fixed.
  assert V.aspect_grid(128, 32, (2, 2)) == (1, 4) and V.aspect_grid(32, 128, (2, 2)) == (4, 1)
  assert V.aspect_grid(40, 40, (2, 2)) == (2, 2) and V.aspect_grid(64, 32, (2, 2)) == (2, 2)
  assert V.aspect_grid(40, 40, (1, 2)) == (1, 2) and V.aspect_grid(30, 60, (1, 2)) == (2, 1)
  rng = np.random.RandomState(0)
  wide = Image.fromarray(rng.randint(0, 256, (24, 100, 3), np.uint8))  # h/w = 0.24 -> (1, 4)
  spec = V.make_vision_spec("clip", 8, deepstack_grid=(2, 2), deepstack_grid_mode="aspect")
  slots, hires = V.preprocess_image(wide, spec)
  assert V.deepstack_grids(wide, spec).tolist() == [[1, 4]] and hires.shape == (1, 4, 8, 8, 3)
  # PIL reference: the image itself (not padded) resized to (1*8, 4*8), cut left to right.
  big = V.normalize(wide.resize((32, 8), Image.BICUBIC), V.CLIP_MEAN, V.CLIP_STD)
  for k in range(4):
    np.testing.assert_allclose(hires[0, k], big[:, 8 * k : 8 * k + 8], atol=1e-6)
  # The global view is unchanged ('pad'), and 'fixed' is exactly as before (padded square, 2 x 2).
  fixed = V.make_vision_spec("clip", 8, deepstack_grid=(2, 2))
  f_slots, f_hires = V.preprocess_image(wide, fixed)
  np.testing.assert_array_equal(slots, f_slots)
  square = V._aspect(wide, fixed)
  np.testing.assert_array_equal(f_hires[0], V.deepstack_crops(square, (2, 2), 8, V.CLIP_MEAN, V.CLIP_STD))
  assert V.deepstack_grids(wide, fixed) is None
  tiles = V.make_vision_spec("internvl", 8, deepstack_grid=(1, 2), deepstack_grid_mode="aspect")
  assert V.deepstack_grids(Image.new("RGB", (64, 32)), tiles).tolist() == [[1, 2]] * 3  # square tiles
  with pytest.raises(ValueError, match="deepstack_grid_mode must be one of"):
    V.make_vision_spec("clip", 8, deepstack_grid=(2, 2), deepstack_grid_mode="best")


def test_spec_validation():
  with pytest.raises(ValueError, match="vision kind"):
    V.make_vision_spec("resnet", 224)
  with pytest.raises(ValueError, match="tile"):
    V.make_vision_spec("clip", 224, aspect_mode="tile")
  assert V.make_vision_spec("internvit", 448).kind == "internvl"
