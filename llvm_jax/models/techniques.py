"""The techniques of the decoder's layer loop, in the fixed order they nest (outermost first).

    DeepStack  adds this layer's group of high-resolution tokens to the hidden state;
    p-MoD      routes the layer's input once (which vision tokens the layer keeps);
    TroL       applies what is inside twice and mixes the passes with its gate;
    p-MoD      runs the layer on the kept tokens and reweights the rest (STRing);
    Phantom    changes the attention inside the layer (its hook only adds cache entries).

So an injected position may be skipped by p-MoD (the addition still lands on its hidden state), and
TroL's second pass reuses the first pass's routing. Cache entries are added innermost first, so
TroL's second cache copies the inner techniques' entries. A fifth technique is one `hooks.Technique`
placed in this list.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from llvm_jax.models import deepstack, hooks, phantom, pmod, trol
from llvm_jax.models.config import DecoderConfig, LLVMConfig

ORDER: tuple[hooks.Technique, ...] = (
    deepstack.INJECTION,
    pmod.ROUTING,
    trol.TRAVERSAL,
    pmod.MOD_LAYER,
    phantom.CACHE_HOOK,
)


def active(config: DecoderConfig) -> tuple[hooks.Technique, ...]:
  """The techniques `config` switches on, outermost first."""
  return tuple(t for t in ORDER if t.enabled(config))


def attention_core(config: DecoderConfig) -> tuple[type[nn.Module], str] | None:
  """(module class, name) replacing the plain cached attention after q/k/v and RoPE, or None."""
  return (phantom.Phantom, "phantom") if config.phantom is not None else None


def layer_signatures(config: DecoderConfig, layer: int, techniques: tuple[hooks.Technique, ...]) -> tuple[Any, ...]:
  """The layer's static signature under each technique (equal signatures can share a scan)."""
  return tuple(t.signature(config, layer, config.scan_layers) for t in techniques)


def switched_on(config: LLVMConfig) -> tuple[str, ...]:
  """Names of the techniques `config` uses (none of them has a `transformers` equivalent)."""
  dec = config.decoder
  names = [
      name
      for name, on in (
          ("trol", dec.trol is not None),
          ("phantom", dec.phantom is not None),
          ("pmod", bool(pmod.layer_ratios(dec))),
      )
      if on
  ]
  return tuple(names + (["deepstack"] if config.deepstack is not None else []))
