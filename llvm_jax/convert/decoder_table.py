"""HF <-> llvm_jax mapping table of the decoder LLM (Llama, Qwen2, Phi-3)."""

from __future__ import annotations

import re

from llvm_jax.convert.core import IDENTITY, Table, linear, per_layer, reshape, rule, split_linear
from llvm_jax.models.config import DecoderConfig


def decoder_table(cfg: DecoderConfig, body: str = "model.", head: str = "") -> Table:
  """Keys of `transformers`' *ForCausalLM: `{body}layers.{i}...`, `{head}lm_head.weight`.

  Our paths are relative to the decoder subtree (unscanned layout `layers_{i}`).
  """
  h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  layer = body + "layers.{i}."
  rules = [
      rule(layer + "self_attn.o_proj.weight", "layers_{i}/attn/o/kernel", linear(in_shape=(h, d))),
      rule(layer + "mlp.down_proj.weight", "layers_{i}/mlp/down/kernel", linear()),
      rule(layer + "input_layernorm.weight", "layers_{i}/input_norm/scale"),
      rule(layer + "post_attention_layernorm.weight", "layers_{i}/post_attn_norm/scale"),
  ]
  if cfg.family == "phi3":
    rules += [
        rule(
            layer + "self_attn.qkv_proj.weight",
            ("layers_{i}/attn/q/kernel", "layers_{i}/attn/k/kernel", "layers_{i}/attn/v/kernel"),
            split_linear([(h * d, (h, d)), (kv * d, (kv, d)), (kv * d, (kv, d))]),
        ),
        rule(
            layer + "mlp.gate_up_proj.weight",
            ("layers_{i}/mlp/gate/kernel", "layers_{i}/mlp/up/kernel"),
            split_linear([(cfg.mlp_dim, ()), (cfg.mlp_dim, ())]),
        ),
    ]
  else:
    for name, heads in (("q", h), ("k", kv), ("v", kv)):
      rules.append(
          rule(layer + f"self_attn.{name}_proj.weight", f"layers_{{i}}/attn/{name}/kernel", linear((heads, d)))
      )
      if cfg.qkv_bias:
        rules.append(
            rule(
                layer + f"self_attn.{name}_proj.bias",
                f"layers_{{i}}/attn/{name}/bias",
                reshape((heads, d), (heads * d,)),
            )
        )
    rules += [
        rule(layer + "mlp.gate_proj.weight", "layers_{i}/mlp/gate/kernel", linear()),
        rule(layer + "mlp.up_proj.weight", "layers_{i}/mlp/up/kernel", linear()),
    ]
  table = per_layer(cfg.num_layers, rules) + [
      rule(body + "embed_tokens.weight", "embedding", IDENTITY),
      rule(body + "norm.weight", "final_norm/scale"),
  ]
  if not cfg.tie_embeddings:
    table.append(rule(head + "lm_head.weight", "lm_head/kernel", linear()))
  ignore = (r".*rotary_emb\.inv_freq",) + ((re.escape(head) + r"lm_head\.weight",) if cfg.tie_embeddings else ())
  return Table(tuple(table), ignore)
