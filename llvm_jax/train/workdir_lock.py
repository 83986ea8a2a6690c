"""A lock on a training workdir, so two runs never write one run's checkpoints and metrics.

The lock is the file `<workdir>/train.lock`, created with O_CREAT | O_EXCL (atomic on local and
NFSv3+ filesystems) and holding the owner's host name and pid. A lock whose pid is dead on this host
is stale (a killed run) and is taken over with a warning; a lock held by a live process, or by any
process on another host (whose liveness cannot be checked from here), is refused with an error
naming the host, the pid and how to remove the lock.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid

from absl import logging

LOCK_NAME = "train.lock"


class WorkdirLockedError(RuntimeError):
  """Another run holds the workdir's lock."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, owned by another user
    return True
  return True


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds `<workdir>/train.lock` for the duration of a run."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_NAME)
    self._token = uuid.uuid4().hex
    self._held = False

  def acquire(self) -> None:
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": self._token, "started": time.time()}
    for _ in range(3):  # a stale lock is moved away, then the create is retried
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        self._handle_existing()
        continue
      with os.fdopen(fd, "w") as f:
        json.dump(owner, f)
        f.flush()
        os.fsync(f.fileno())
      self._held = True
      return
    raise WorkdirLockedError(f"could not take {self.path}: another run keeps creating it")

  def _handle_existing(self) -> None:
    """Moves a stale lock away; raises WorkdirLockedError for a live or unverifiable one."""
    try:
      with open(self.path) as f:
        holder = json.load(f)
      host, pid = str(holder["host"]), int(holder["pid"])
    except FileNotFoundError:
      return  # released meanwhile: retry
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise WorkdirLockedError(
          f"workdir lock {self.path} exists but is unreadable ({type(e).__name__}: {e}); if no run uses this "
          f"workdir, delete it: rm {self.path}"
      ) from None
    if host == socket.gethostname() and not _pid_alive(pid):
      # Rename first (atomic), so two runs taking over the same stale lock cannot both succeed.
      stale = f"{self.path}.stale.{uuid.uuid4().hex}"
      try:
        os.rename(self.path, stale)
      except FileNotFoundError:
        return
      os.remove(stale)
      logging.warning("workdir lock %s was held by pid %d on %s, which is dead: taken over", self.path, pid, host)
      return
    where = "this host" if host == socket.gethostname() else f"host {host!r}"
    raise WorkdirLockedError(
        f"workdir {os.path.dirname(self.path)} is in use by another run: pid {pid} on {where} holds {self.path}. "
        f"Wait for it, use another --workdir, or, if that run is gone (e.g. its machine died), delete the lock: "
        f"rm {self.path}"
    )

  def release(self) -> None:
    if not self._held:
      return
    self._held = False
    try:
      with open(self.path) as f:
        mine = json.load(f).get("token") == self._token
    except (OSError, ValueError):
      mine = False
    if mine:  # never remove a lock someone took over from us
      os.remove(self.path)

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
