"""Data: TFDS builders (ArrayRecord, no TensorFlow) and the grain input pipeline.

  config.default_data_config()                 the data block of an experiment config
  pipeline.make_iterator(data_cfg, tokenizer, num_image_tokens=..., image_token=...)
  pipeline.make_global_batch(local_batch, mesh, data_axes=('data', 'fsdp'))
  builders.build_dataset('synthetic_vqa', data_dir, config='small')   (CLI: python -m llvm_jax.data.build)
  tokenizer.build_tiny_tokenizer(out_dir)        a word-level tokenizer for the synthetic data
  synthetic.draw_sample(seed, spec)              one synthetic VQA sample

Modules are imported lazily (`from llvm_jax.data import pipeline`) so that importing the package
does not pull in TFDS, grain or transformers.
"""
