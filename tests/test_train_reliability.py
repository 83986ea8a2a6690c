"""Issue #17 (trainer side): workdir lock, exit statuses, metrics on resume, config validation,
optimiser-state mismatch, finished reruns, a SIGTERM anywhere in a step, and meshes over processes."""

import json
import os
import subprocess

import pytest
from multiprocess_helpers import REPO, free_port, run_cli, run_workers, worker_env
from train_helpers import run, tiny_config

from llvm_jax.train import checkpoint, trainer
from llvm_jax.train.workdir_lock import LOCK_NAME, WorkdirLock, WorkdirLockedError

MESH_WORKER = os.path.join(REPO, "tests", "mesh_check_worker.py")


def steps_logged(workdir):
  return [json.loads(l)["step"] for l in open(os.path.join(workdir, "metrics.jsonl"))]


# Row 2: two trainings in one workdir.
def test_second_run_on_a_locked_workdir_fails_fast(tmp_path):
  with WorkdirLock(str(tmp_path)):  # a live run (this process) holds the workdir
    with pytest.raises(WorkdirLockedError, match=rf"pid {os.getpid()} on this host holds .*{LOCK_NAME}.*rm "):
      run(tiny_config(total_steps=2), tmp_path)
  assert not {"checkpoints", "config.json", "metrics.jsonl", LOCK_NAME} & set(os.listdir(tmp_path))


def test_stale_lock_of_a_dead_pid_is_taken_over(tmp_path):
  dead = subprocess.Popen(["true"])
  dead.wait()
  (tmp_path / LOCK_NAME).write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid}))
  last, _ = run(tiny_config(total_steps=2, checkpoint_every=100), tmp_path)
  assert last["status"] == trainer.STATUS_COMPLETED and not os.path.exists(tmp_path / LOCK_NAME)


def test_lock_of_another_host_is_refused(tmp_path):
  (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1}))
  with pytest.raises(WorkdirLockedError, match="pid 1 on host 'elsewhere'"):
    WorkdirLock(str(tmp_path)).acquire()


# Rows 3 and 15: SIGTERM -> a committed save and a "preempted" status (main.py: exit 75).
def test_sigterm_during_a_save_still_saves_that_step_and_reports_preempted(tmp_path, monkeypatch):
  # The signal lands inside the step-3 save, after the step's flag was read: step 3 must be the
  # preemption checkpoint (not step 4), committed before "saved" is claimed.
  real_save = checkpoint.save

  def save_then_sigterm(mngr, step, *args, **kwargs):
    started = real_save(mngr, step, *args, **kwargs)
    if step == 3:
      os.kill(os.getpid(), 15)
    return started

  monkeypatch.setattr(checkpoint, "save", save_then_sigterm)
  last, _ = run(tiny_config(total_steps=6, checkpoint_every=3), tmp_path)
  assert last["status"] == trainer.STATUS_PREEMPTED and last["step"] == 3
  assert checkpoint.latest_step(str(tmp_path)) == 3
  assert steps_logged(tmp_path) == [1, 2, 3]


def test_main_exit_codes():
  from llvm_jax import main

  assert main.exit_code({"status": trainer.STATUS_PREEMPTED}) == main.EXIT_PREEMPTED == 75
  assert main.exit_code({"status": trainer.STATUS_COMPLETED}) == 0
  assert main.exit_code({"status": trainer.STATUS_ALREADY_COMPLETE}) == 0
  assert len({main.EXIT_PREEMPTED, main.EXIT_NONFINITE, main.EXIT_WORKDIR_LOCKED, 0, 1}) == 5


def test_main_maps_nan_stop_and_locked_workdir_to_exit_codes(tmp_path, monkeypatch):
  from llvm_jax import main

  def raises(error):
    def task(config, workdir):
      raise error

    return task

  config = tiny_config()
  monkeypatch.setitem(main.TASKS, "train", raises(trainer.NonFiniteLossError("loss nan at step 3")))
  assert main.run_task(config, str(tmp_path)) == main.EXIT_NONFINITE == 65
  monkeypatch.setitem(main.TASKS, "train", raises(WorkdirLockedError("in use")))
  assert main.run_task(config, str(tmp_path)) == main.EXIT_WORKDIR_LOCKED == 73
  monkeypatch.setitem(main.TASKS, "train", lambda config, workdir: {"status": trainer.STATUS_PREEMPTED})
  assert main.run_task(config, str(tmp_path)) == main.EXIT_PREEMPTED


# Row 4: replayed steps are not logged twice.
def test_resume_drops_the_replayed_metrics(tmp_path):
  run(tiny_config(total_steps=5, checkpoint_every=3), tmp_path)
  # As if killed after step 5 (metrics written up to 5, a torn line) with the last checkpoint at 3.
  checkpoint_dir = tmp_path / "checkpoints"
  for name in os.listdir(checkpoint_dir):
    if name.isdigit() and int(name) > 3:
      import shutil

      shutil.rmtree(checkpoint_dir / name)
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "train/lo')
  assert checkpoint.latest_step(str(tmp_path)) == 3
  run(tiny_config(total_steps=5, checkpoint_every=3), tmp_path)
  assert steps_logged(tmp_path) == [1, 2, 3, 4, 5]


# Rows 10 and 11: config validation names the field.
@pytest.mark.parametrize("field,value", [("total_steps", -5), ("total_steps", 0), ("log_every", 0)])
def test_bad_train_settings_are_named(tmp_path, field, value):
  config = tiny_config(**{field: value})
  with pytest.raises(ValueError, match=rf"config.train.{field}={value}"):
    run(config, tmp_path)


@pytest.mark.parametrize(
    "override,named",
    [
        ("train.total_steps=-5", "config.train.total_steps=-5"),
        ("data.global_batch_size=0", "config.data.global_batch_size=0"),
    ],
)
def test_cli_rejects_bad_settings_before_building_anything(tmp_path, override, named):
  result = run_cli(
      "llvm_jax.main", "--config=configs/demo.py", f"--workdir={tmp_path}", f"--config.{override}", check=False
  )
  assert result.returncode != 0 and named in result.stderr, result.stderr[-2000:]
  assert not os.path.exists(tmp_path / "tokenizer")  # failed before the tokenizer / data were built


def test_zero_global_batch_size_is_named():
  from llvm_jax.data.config import default_data_config, validate_data_config

  cfg = default_data_config()
  cfg.global_batch_size = 0
  with pytest.raises(ValueError, match="config.data.global_batch_size=0"):
    validate_data_config(cfg)


# Row 12: resuming after changing an optimiser group.
def test_changed_optimizer_groups_name_the_params_only_option(tmp_path):
  run(tiny_config(total_steps=2, checkpoint_every=2), tmp_path)

  def changed(**train):
    config = tiny_config(total_steps=4, checkpoint_every=100, **train)
    config.unlock()
    config.optim.trainable = [("projector/.*", 0.5), (".*", 1.0)]
    config.lock()
    return config

  with pytest.raises(trainer.OptimizerStateMismatchError, match="train.resume_params_only=True"):
    run(changed(), tmp_path)
  last, data = run(changed(resume_params_only=True), tmp_path)
  assert last["status"] == trainer.STATUS_COMPLETED and data.index == 4  # data resumed at batch 2
  assert checkpoint.latest_step(str(tmp_path)) == 4


# Row 13: rerunning a finished run.
def test_rerun_of_a_finished_run_reports_already_complete(tmp_path):
  first, _ = run(tiny_config(total_steps=2, checkpoint_every=100), tmp_path)
  again, data = run(tiny_config(total_steps=2, checkpoint_every=100), tmp_path)
  assert again["status"] == trainer.STATUS_ALREADY_COMPLETE and again["step"] == 2
  assert again["loss"] == pytest.approx(first["loss"]) and data.index == 2  # nothing drawn
  assert steps_logged(tmp_path) == [1, 2]


# Row 1: processes must feed distinct batch rows.
@pytest.mark.slow
def test_mesh_replicating_the_batch_over_processes_is_an_error(tmp_path):
  env = worker_env(devices=2)
  port = free_port()
  logs = run_workers(MESH_WORKER, [[str(i), str(port)] for i in range(2)], env, timeout=180)
  for log in logs:
    assert "MESH (1, 1, 4) dp: ValueError sharding.strategy='dp', sharding.mesh_shape=(1, 1, 4): mesh" in log, log
    assert "over 2 processes" in log
    assert "MESH (4, 1, 1) dp: ok, 8 rows, sum equal" in log, log
