"""Logical axis names on every parameter and their mapping to the mesh (8 fake CPU devices)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from llvm_jax import config_utils, convert, sharding
from llvm_jax.convert import core
from llvm_jax.models.llvm import LLVM


@pytest.fixture(scope="module")
def abstract():
  model = LLVM(config_utils.tiny_llvm())
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *convert.dummy_inputs(model.config))["params"])
  return model, boxed


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
      s: core.flatten(jax.tree.map(lambda x: x.spec, sharding.param_shardings(boxed, mesh, s)))
      for s in ("dp", "fsdp", "fsdp_tp")
  }
  q = "decoder/layers_0/attn/q/kernel"  # (embed, heads, head_dim)
  assert specs["dp"][q] == P(None, None, None)
  assert specs["fsdp"][q] == P("fsdp", None, None)
  assert specs["fsdp_tp"][q] == P("fsdp", "tensor", None)
  assert specs["fsdp_tp"]["decoder/layers_0/mlp/down/kernel"] == P("tensor", "fsdp")
  assert specs["fsdp_tp"]["decoder/embedding"] == P("tensor", "fsdp")


def test_params_born_sharded(abstract):
  model, boxed = abstract
  mesh = sharding.make_mesh((2, 2, 2))
  shardings = sharding.param_shardings(boxed, mesh, "fsdp_tp")
  rules = sharding.logical_rules("fsdp_tp")

  def init():
    with nn.logical_axis_rules(rules):
      return nn.unbox(model.init(jax.random.key(0), *convert.dummy_inputs(model.config))["params"])

  params = jax.jit(init, out_shardings=shardings)()
  kernel = params["decoder"]["layers_0"]["mlp"]["up"]["kernel"]  # (embed=64, mlp=128)
  assert kernel.sharding.spec == P("fsdp", "tensor")
  assert kernel.addressable_shards[0].data.shape == (32, 64)


def test_mesh_shape_errors_are_clear():
  with pytest.raises(ValueError, match="needs 6 devices"):
    sharding.make_mesh((3, 2, 1))
  assert sharding.make_mesh((-1, 2, 1)).shape == {"data": 4, "fsdp": 2, "tensor": 1}
  with pytest.raises(ValueError, match="unknown sharding strategy"):
    sharding.logical_rules("zero3")
