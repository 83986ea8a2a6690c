"""Logical axis names on every parameter and their mapping to the mesh (8 fake CPU devices); optimiser
state sharded like the params."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from train_helpers import tiny_config

from llvm_jax import config_utils, sharding, tree_utils
from llvm_jax.models.llvm import LLVM
from llvm_jax.train import trainer


@pytest.fixture(scope="module")
def abstract():
  model = LLVM(config_utils.tiny_llvm())
  return model, trainer.abstract_boxed_params(model)


def test_every_parameter_has_logical_names(abstract):
  _, boxed = abstract
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), leaf
    assert len(leaf.names) == len(leaf.value.shape)


def test_partition_specs_per_strategy(abstract):
  _, boxed = abstract
  mesh = sharding.make_mesh((2, 2, 2))
  specs = {
      s: tree_utils.flatten(jax.tree.map(lambda x: x.spec, sharding.param_shardings(boxed, mesh, s)))
      for s in ("dp", "fsdp", "fsdp_tp")
  }
  q = "decoder/layers_0/attn/q/kernel"  # (embed, heads, head_dim)
  assert specs["dp"][q] == P(None, None, None)
  assert specs["fsdp"][q] == P("fsdp", None, None)
  assert specs["fsdp_tp"][q] == P("fsdp", "tensor", None)
  assert specs["fsdp_tp"]["decoder/layers_0/mlp/down/kernel"] == P("tensor", "fsdp")
  assert specs["fsdp_tp"]["decoder/embedding"] == P("tensor", "fsdp")


def test_a_dimension_its_mesh_axes_do_not_divide_is_replicated_along_them():
  model = LLVM(config_utils.tiny_llvm(vocab_size=131))  # 131 rows over a 2-way 'tensor' axis
  mesh = sharding.make_mesh((2, 2, 2))
  shardings = sharding.param_shardings(trainer.abstract_boxed_params(model), mesh, "fsdp_tp")
  specs = tree_utils.flatten(jax.tree.map(lambda x: x.spec, shardings))
  assert specs["decoder/embedding"] == P(None, "fsdp")
  assert specs["decoder/layers_0/mlp/down/kernel"] == P("tensor", "fsdp")  # divisible: unchanged
  rules = sharding.logical_rules("fsdp_tp")
  # An indivisible spec would raise in this jit's out_shardings.
  params = trainer.init_params_sharded(model, jax.random.key(0), mesh, rules, shardings)
  assert params["decoder"]["embedding"].addressable_shards[0].data.shape == (131, 32)


def test_params_born_sharded(abstract):
  model, boxed = abstract
  mesh = sharding.make_mesh((2, 2, 2))
  shardings = sharding.param_shardings(boxed, mesh, "fsdp_tp")
  rules = sharding.logical_rules("fsdp_tp")
  params = trainer.init_params_sharded(model, jax.random.key(0), mesh, rules, shardings)
  kernel = params["decoder"]["layers_0"]["mlp"]["up"]["kernel"]  # (embed=64, mlp=128)
  assert kernel.sharding.spec == P("fsdp", "tensor")
  assert kernel.addressable_shards[0].data.shape == (32, 64)


def test_mesh_shape_errors_are_clear():
  with pytest.raises(ValueError, match="needs 6 devices"):
    sharding.make_mesh((3, 2, 1))
  assert sharding.make_mesh((-1, 2, 1)).shape == {"data": 4, "fsdp": 2, "tensor": 1}
  with pytest.raises(ValueError, match="unknown sharding strategy"):
    sharding.logical_rules("zero3")


@pytest.mark.parametrize("strategy,mesh_shape", [("fsdp", (1, 8, 1)), ("fsdp_tp", (2, 2, 2))])
def test_optimizer_moments_are_sharded_like_their_params(strategy, mesh_shape):
  # A frozen group (set_to_zero: empty state) and an lr-multiplier group (masked Adam states) too.
  config = tiny_config(mesh_shape=mesh_shape, strategy=strategy)
  config.unlock()
  config.optim.trainable = [("vision/.*", None), ("projector/.*", 0.1), (".*", 1.0)]
  config.lock()
  mesh = trainer.mesh_from_config(config)
  setup, abstract = trainer.build_setup(config, LLVM(config_utils.model_config(config)), mesh)
  param_specs = {
      tuple(jax.tree_util.keystr((k,)) for k in path): s.spec
      for path, s in jax.tree_util.tree_flatten_with_path(setup.param_shardings)[0]
  }
  moments = {}
  for path, s in jax.tree_util.tree_flatten_with_path(setup.opt_shardings)[0]:
    keys = tuple(jax.tree_util.keystr((k,)) for k in path)
    moment = next((i for i, k in enumerate(keys) if k in (".mu", ".nu")), None)
    if moment is None:
      assert s.spec == P(), (keys, s.spec)  # counts
      continue
    assert s.spec == param_specs[keys[moment + 1 :]], keys
    moments[keys[moment:]] = s.spec
  trainable = [k for k in param_specs if k[0] != "['vision']"]
  assert len(moments) == 2 * len(trainable)
  assert sum(any(a is not None for a in spec) for spec in moments.values()) > len(trainable)  # sharded ones

  # Per-device argument bytes of the (params, optimiser state) pair, as compiled: each leaf holds
  # 1/(devices it is split over) of its bytes; with FSDP over all 8 devices, sharded leaves 1/8.
  abstract_opt = jax.eval_shape(setup.tx.init, abstract)
  args = (
      trainer.sharded_abstract(abstract, setup.param_shardings),
      trainer.sharded_abstract(abstract_opt, setup.opt_shardings),
  )
  memory = jax.jit(lambda p, o: None, keep_unused=True).lower(*args).compile().memory_analysis()
  leaves = jax.tree.leaves(args)
  nbytes = lambda shape, x: int(np.prod(shape)) * x.dtype.itemsize
  split = lambda x: int(
      np.prod([mesh.shape[a] for axes in x.sharding.spec if axes for a in ((axes,) if isinstance(axes, str) else axes)])
  )
  assert memory.argument_size_in_bytes == sum(nbytes(x.shape, x) // split(x) for x in leaves)
  sharded = [x for x in leaves if split(x) > 1]
  per_device = sum(nbytes(x.sharding.shard_shape(x.shape), x) for x in sharded)
  expected = sum(nbytes(x.shape, x) / split(x) for x in sharded)
  assert per_device == expected
  if strategy == "fsdp":
    assert per_device == sum(nbytes(x.shape, x) for x in sharded) / 8
    # The sharded leaves hold most of the bytes, so the whole state is not far from total/8.
    assert memory.argument_size_in_bytes < 0.2 * sum(nbytes(x.shape, x) for x in leaves)
