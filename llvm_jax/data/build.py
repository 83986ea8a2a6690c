"""Builds a dataset into a TFDS data_dir (ArrayRecord, no TensorFlow, no network).

  python -m llvm_jax.data.build synthetic_vqa --config small --data_dir /data/tfds
  python -m llvm_jax.data.build synthetic_vqa --config my64 --set num_train=1000 --set image_size=32 \\
      --data_dir /data/tfds
  python -m llvm_jax.data.build llava_instruct --config sft --manual_dir /data/llava --data_dir /data/tfds
  python -m llvm_jax.data.build preference --manual_dir /data/pref --data_dir /data/tfds --strict

`--set key=value` changes fields of the named config (a new config name is then required: data
built with other settings must not land in a registered config's directory). Prints the skip
report of each split and writes it to skip_report.json in the dataset directory.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import sys

from llvm_jax.data import builders


def _parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def make_config(name: str, config: str | None, overrides: list[str]):
  """The BuilderConfig to build: a registered one, or a registered one with fields changed."""
  cls = builders.BUILDERS[name]
  if not overrides:
    return config
  base_name = cls.DEFAULT_CONFIG_NAME
  registered = {c.name: c for c in cls.BUILDER_CONFIGS}
  if config is None or config in registered:
    raise SystemExit("--set needs a new --config name (not one of " + ", ".join(sorted(registered)) + ")")
  fields = {}
  for item in overrides:
    key, sep, value = item.partition("=")
    if not sep:
      raise SystemExit(f"--set expects key=value, got {item!r}")
    fields[key] = _parse_value(value)
  base = registered[base_name]
  valid = {f.name for f in dataclasses.fields(base)}
  unknown = sorted(set(fields) - valid)
  if unknown:
    raise SystemExit(
        f"unknown config field(s) {unknown}; valid: {sorted(valid - {'name', 'version', 'release_notes', 'supported_versions', 'tags'})}"
    )
  for key, value in fields.items():
    if isinstance(value, list):
      fields[key] = tuple(value)
  return dataclasses.replace(base, name=config, description=f"{base_name} with {fields}", **fields)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("dataset", choices=sorted(builders.BUILDERS))
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--config", default=None, help="builder config name (default: the builder's default)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
  parser.add_argument("--manual_dir", default=None, help="directory with the input JSON and images")
  parser.add_argument("--strict", action="store_true", help="fail on the first bad record")
  parser.add_argument("--overwrite", action="store_true", help="rebuild even if the dataset exists")
  args = parser.parse_args(argv)
  config = make_config(args.dataset, args.config, args.set)
  builder = builders.build_dataset(
      args.dataset,
      args.data_dir,
      config,
      manual_dir=args.manual_dir,
      strict=True if args.strict else None,
      overwrite=args.overwrite,
  )
  # The CLI's output (stdout): the skip report and example count of each split; the builders log.
  for report in builder.skip_reports.values():
    print(report.summary())
  for split, info in builder.info.splits.items():
    print(f"{builder.name}/{builder.builder_config.name} {split}: {info.num_examples} examples")
  print(f"built in {builder.data_path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
