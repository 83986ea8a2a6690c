"""Evaluators (scoring on hand-made predictions), the predict CLI and the eval task on a checkpoint a
training run writes here, and params-only restores onto another mesh."""

import json
import os
import re

import jax
import numpy as np
import pytest
from multiprocess_helpers import REPO, run_cli
from train_helpers import SyntheticBatches, tiny_config

from llvm_jax import config_utils, convert, evaluators, predict, sampler
from llvm_jax.data import synthetic
from llvm_jax.data.config import default_data_config
from llvm_jax.data.tokenizer import build_tiny_tokenizer, load_tokenizer
from llvm_jax.evaluators import scoring
from llvm_jax.models.llvm import LLVM
from llvm_jax.train import checkpoint, trainer
from llvm_jax.tree_utils import flatten

STEPS = 4


# -- scoring --------------------------------------------------------------------------------------
def test_vqa_normalisation_and_accuracy():
  assert scoring.normalize_answer("Two dogs.") == "2 dogs"
  assert scoring.normalize_answer("  The Top-Left!\n") == "top left"
  assert scoring.normalize_answer("3.5") == "3.5"
  assert scoring.normalize_answer("dont know") == "don't know"
  assert scoring.vqa_accuracy("the red one", ["red one"]) == 1.0
  # 10 human answers, 2 match: 2 leave-one-out subsets keep 1 match (1/3), 8 keep 2 (2/3) -> 0.6.
  answers = ["yes", "yes"] + ["no"] * 8
  assert scoring.vqa_accuracy("Yes", answers) == pytest.approx(0.6)
  assert scoring.vqa_accuracy("no", answers) == 1.0
  assert scoring.vqa_accuracy("maybe", answers) == 0.0


def test_option_letter_extraction():
  options = ["red", "green", "blue"]
  assert scoring.option_letter("B", options) == "B"
  assert scoring.option_letter("(C) blue", options) == "C"
  assert scoring.option_letter("The answer is A.", options) == "A"
  assert scoring.option_letter("green", options) == "B"  # the option's text
  assert scoring.option_letter("D", options) is None  # not one of three options
  assert scoring.option_letter("purple", options) is None


def test_question_prior_baseline():
  guess = scoring.question_prior(
      [
          ("q1", "red", False),
          ("q1", "red", False),
          ("q1", "blue", False),
          ("q2", "B", True),
          ("q3", "C", True),
          ("q4", "C", True),
      ]
  )
  assert guess("q1", False) == "red"
  assert guess("unseen", True) == "C"  # most frequent multiple-choice answer
  assert guess("unseen", False) == "red"


def _evaluator(kind, tmp_path, records, **kwargs):
  tok = load_tokenizer(build_tiny_tokenizer(str(tmp_path / "tok")))
  model = LLVM(config_utils.tiny_llvm())
  ev = evaluators.make(
      "hand",
      dict(type=kind, **kwargs),
      model=model,
      tokenizer=tok,
      data_config=default_data_config(),
      workdir=str(tmp_path),
  )
  ev.predict = lambda params: [dict(r) for r in records]
  return ev


HAND_MADE = [
    {"id": "0", "question": "q", "prediction": "Red.", "answer": "red", "options": []},
    {"id": "1", "question": "q", "prediction": "two", "answer": "2", "options": []},
    {"id": "2", "question": "q", "prediction": "circle", "answer": "square", "options": []},
    {"id": "3", "question": "q", "prediction": "B", "answer": "B", "options": ["x", "y"]},
    {"id": "4", "question": "q", "prediction": "x", "answer": "B", "options": ["x", "y"]},
]


def test_evaluators_on_hand_made_predictions(tmp_path):
  metrics = _evaluator("vqa", tmp_path, HAND_MADE).run(None, step=7)
  assert metrics == {"accuracy": 3 / 5, "examples": 5, "skipped": 0}
  saved = json.load(open(tmp_path / "eval" / "hand_step7_process0.json"))
  assert [r["score"] for r in saved["predictions"]] == [1.0, 1.0, 0.0, 1.0, 0.0]
  assert json.load(open(tmp_path / "eval" / "hand_step7_metrics.json")) == metrics
  mc = _evaluator("multiple_choice", tmp_path, HAND_MADE).run(None, step=7)
  assert mc == {"accuracy": 0.5, "examples": 2, "skipped": 3}
  em = _evaluator("exact_match", tmp_path, HAND_MADE).run(None, step=7)
  assert em["accuracy"] == 1 / 5  # only "B" == "B" verbatim
  with pytest.raises(ValueError, match="evals.hand.type='bleu' unknown"):
    _evaluator("bleu", tmp_path, HAND_MADE)
  with pytest.raises(ValueError, match="evals.hand .*max_new"):
    _evaluator("vqa", tmp_path, HAND_MADE, max_new=3)
  # dataset=: scores another dataset than the training data's (VQA after preference training).
  other = _evaluator("vqa", tmp_path, HAND_MADE, dataset="synthetic_vqa/tiny", split="validation")
  assert (other.settings.name, other.settings.split) == ("synthetic_vqa/tiny", "validation")
  assert _evaluator("vqa", tmp_path, HAND_MADE).data_config.name == default_data_config().name


def test_accuracy_per_question_type(tmp_path, monkeypatch):
  types = ["color", "count", "shape", "shape", "color"]
  typed = [dict(r, question_type=t) for r, t in zip(HAND_MADE, types)]
  ev = _evaluator("vqa", tmp_path, typed, baseline_split="train")
  ev._prior = lambda question, multiple_choice: "red"  # the blind baseline always answers "red"
  metrics = ev.run(None, step=3)
  assert metrics == {
      "accuracy": 3 / 5,
      "examples": 5,
      "skipped": 0,
      "chance": 1 / 5,
      "accuracy/color": 0.5,
      "examples/color": 2,
      "chance/color": 0.5,
      "accuracy/count": 1.0,
      "examples/count": 1,
      "chance/count": 0.0,
      "accuracy/shape": 0.5,
      "examples/shape": 2,
      "chance/shape": 0.0,
  }
  saved = json.load(open(tmp_path / "eval" / "hand_step3_process0.json"))
  assert [r["question_type"] for r in saved["predictions"]] == types
  # Only scored records count: multiple_choice skips the open questions (no count key left empty).
  mc = _evaluator("multiple_choice", tmp_path, typed).run(None, step=3)
  assert mc == {
      "accuracy": 0.5,
      "examples": 2,
      "skipped": 3,
      **{"accuracy/color": 0.0, "examples/color": 1, "accuracy/shape": 1.0, "examples/shape": 1},
  }
  # Batches without the field: the type is looked up by id in the split's records (bytes, as TFDS
  # gives them); a split without the field adds nothing.
  source = [{"id": r["id"].encode(), "question_type": t.encode()} for r, t in zip(HAND_MADE, types)]
  monkeypatch.setattr(evaluators.vqa, "open_data_source", lambda *args: source)
  ev = _evaluator("vqa", tmp_path, HAND_MADE)
  assert [r["question_type"] for r in ev._with_question_types([dict(r) for r in HAND_MADE])] == types
  monkeypatch.setattr(evaluators.vqa, "open_data_source", lambda *args: [{"id": b"0"}])
  ev = _evaluator("vqa", tmp_path, HAND_MADE)
  assert all("question_type" not in r for r in ev._with_question_types([dict(r) for r in HAND_MADE]))


# -- a real run: train a few steps, then predict / evaluate its checkpoint ---------------------------
def _main(*args, module="llvm_jax.main"):
  return run_cli(module, *args).stdout


@pytest.fixture(scope="module")
def training_run(tmp_path_factory):
  """The run's workdir and its console output. Its evals: the config's own (updated) and one added from
  the command line, every 2 steps."""
  root = tmp_path_factory.mktemp("run")
  workdir = root / "work"
  result = run_cli(
      "llvm_jax.main",
      f"--config={REPO}/configs/demo.py:steps={STEPS},res=32,patch=16",
      f"--workdir={workdir}",
      "--config.data.name=synthetic_vqa/tiny",
      f"--config.data.data_dir={root}/tfds",
      "--config.data.global_batch_size=8",
      "--config.train.checkpoint_every=2",
      "--config.train.log_every=1",
      "--config.train.eval_every=2",
      "--config.eval_specs=test,baseline_split=train;extra:exact_match,split=test,max_examples=2",
  )
  return workdir, result


@pytest.fixture(scope="module")
def run_dir(training_run):
  return training_run[0]


@pytest.mark.slow
def test_evals_and_progress_are_printed_as_they_happen(training_run):
  out, err = training_run[1].stdout, training_run[1].stderr
  assert f"step {STEPS}/{STEPS}" in out and "ETA" in out and "avg loss" in out
  for step in (2, STEPS):  # intermediate and final evals
    assert f"eval test at step {step}" in out and f"eval extra at step {step}" in out
  # Library INFO is off by default: no absl/Orbax 'I1130 ...' lines.
  assert not re.search(r"^I\d{4} ", err, re.M), err[:2000]


def test_training_run_evaluates_with_chance_level(run_dir):
  metrics = json.load(open(run_dir / "eval" / f"test_step{STEPS}_metrics.json"))
  assert metrics["examples"] == 64  # the whole tiny test split, padding rows not counted
  assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.1 < metrics["chance"] < 0.6
  # synthetic_vqa records carry their question type: accuracy, chance and count per type too.
  types = [k.split("/", 1)[1] for k in metrics if k.startswith("examples/")]
  assert types and sum(metrics[f"examples/{t}"] for t in types) == 64
  assert all(f"accuracy/{t}" in metrics and f"chance/{t}" in metrics for t in types)
  predictions = json.load(open(run_dir / "eval" / f"test_step{STEPS}_process0.json"))["predictions"]
  assert len({p["id"] for p in predictions}) == 64


def test_eval_task_reproduces_the_training_eval(run_dir):
  path = run_dir / "eval" / f"test_step{STEPS}_process0.json"
  trained = json.load(open(path))
  os.remove(path)
  out = _main(
      f"--config={REPO}/configs/demo.py:task=eval,res=32,patch=16",
      f"--workdir={run_dir}",
      "--config.data.name=synthetic_vqa/tiny",
      f"--config.data.data_dir={run_dir.parent}/tfds",
      "--config.data.global_batch_size=8",
      "--config.evals.test.baseline_split=train",
  )
  assert f"step {STEPS}" in out and f"{trained['metrics']['accuracy']:.4f}" in out
  again = json.load(open(path))  # written anew by the eval task
  assert again == trained


def test_predict_cli_answers_like_the_library(run_dir, tmp_path):
  sample = synthetic.draw_sample(123, synthetic.SyntheticSpec(image_size=32))
  image = tmp_path / "x.png"
  image.write_bytes(synthetic.encode_png(sample["image"]))
  question = sample["question"]
  printed = _main(
      f"--checkpoint={run_dir}",
      f"--image={image}",
      f"--question={question}",
      "--mesh_shape=2,4,1",
      "--max_new_tokens=6",
      module="llvm_jax.predict",
  ).strip()
  predictor = predict.from_checkpoint(str(run_dir / "checkpoints" / str(STEPS)))
  expected = predictor.answer([image.read_bytes()], question, sampler.SamplingConfig(max_new_tokens=6))
  assert printed == expected
  # The same answer as the evaluator's path: the prompt tokens match the eval pipeline's.
  assert predictor.inputs([image.read_bytes()], question)["tokens"].shape[1] in sampler.DEFAULT_BUCKETS
  streamed = []
  assert (
      predictor.answer([image.read_bytes()], question, sampler.SamplingConfig(max_new_tokens=6), stream=streamed.append)
      == expected
  )
  assert "".join(streamed).strip() == expected


def test_missing_or_mismatched_checkpoints_are_named(run_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    predict.from_checkpoint(str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 3 .*have \[1, 2, 4\]"):
    predict.from_checkpoint(str(run_dir), step=3)
  config, _, _ = checkpoint.read_config(str(run_dir))
  config.model.decoder.num_layers = 5
  model = LLVM(config_utils.model_config(config))
  with pytest.raises(convert.WeightMismatchError, match=r"missing \(9\): decoder/layers_4/"):
    checkpoint.params_only(str(run_dir), trainer.param_targets(config, model, predict.mesh_for_inference()))


def test_params_only_restore_onto_2x4_mesh_from_8x1_save(tmp_path):
  config = tiny_config(total_steps=3, mesh_shape=(8, 1, 1), strategy="dp")
  mesh = trainer.mesh_from_config(config)
  last = trainer.train(config, str(tmp_path), SyntheticBatches(mesh, config_utils.model_config(config)))
  model = LLVM(config_utils.model_config(config))
  fsdp = config_utils.experiment(model.config, lock=False)
  fsdp.sharding.strategy = "fsdp"
  params, step = checkpoint.params_only(
      str(tmp_path), trainer.param_targets(fsdp, model, predict.mesh_for_inference((2, 4, 1)))
  )
  assert step == 3
  kernel = params["decoder"]["layers_0"]["mlp"]["up"]["kernel"]
  assert kernel.sharding.mesh.shape == {"data": 2, "fsdp": 4, "tensor": 1}
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
  a, b = flatten(last["params"]), flatten(params)
  assert a.keys() == b.keys()
  assert all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)
