"""Output-path safety for the CLIs that write beside a run (export, sample): nothing of a run is ever replaced.

An output directory (`--out`) is resolved the way the filesystem will resolve it (symlinks, `..`, trailing slashes,
relative paths) and refused, in one line and before anything is loaded or compiled, when

  * it is a training workdir, lies inside one, or holds one (replacing it would delete checkpoints);
  * it exists and is not a directory;
  * it is not empty and --overwrite was not given, or it is not empty and does not hold a previous output of the
    same tool (its marker file): --overwrite replaces an earlier export, never an arbitrary directory;
  * it cannot be created or written (read-only filesystem, permissions).

A training workdir is recognised by what the trainer writes into it: config.json beside checkpoints/, or the trainer's
lock file.
"""

import contextlib
import os
import shutil
import tempfile

RUN_MARKERS = (("config.json", "checkpoints"), (".rflow_jax.lock",))  # Any one group present: a training workdir.


class OutputPathError(ValueError):
  """An output path that would destroy data or cannot be written; the message names the path."""


def real(path: str | os.PathLike[str]) -> str:
  """The absolute path with every symlink, `..` and trailing slash resolved (the tail need not exist)."""
  return os.path.realpath(os.path.abspath(os.fspath(path)))


def is_run_dir(path: str) -> bool:
  """Whether `path` is a training workdir (by the files the trainer writes)."""
  return any(all(os.path.exists(os.path.join(path, name)) for name in group) for group in RUN_MARKERS)


def enclosing_run(path: str) -> str | None:
  """The training workdir that `path` is, or lies inside (after resolving it), or None."""
  current = real(path)
  while True:
    if os.path.isdir(current) and is_run_dir(current):
      return current
    parent = os.path.dirname(current)
    if parent == current:
      return None
    current = parent


def _nested_run(path: str) -> str | None:
  """A training workdir somewhere below `path` (which is about to be replaced), or None."""
  for root, dirs, _ in os.walk(path):
    if is_run_dir(root):
      return root
    dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
  return None


def _nearest_existing(path: str) -> str:
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return path


def check_writable_dir(path: str, flag: str) -> None:
  """Raises OutputPathError when `path` (a directory to be created or written into) cannot be written."""
  target = real(path)
  if os.path.exists(target) and not os.path.isdir(target):
    raise OutputPathError(f"{flag}={os.fspath(path)!r} exists and is not a directory")
  base = _nearest_existing(target)
  if not os.path.isdir(base):
    raise OutputPathError(f"{flag}={os.fspath(path)!r}: {base!r} is not a directory")
  try:  # A probe, not os.access: access() says yes to root on a read-only mount's neighbours and on NFS.
    probe = tempfile.mkdtemp(prefix=".rflow_jax_probe-", dir=base)
    os.rmdir(probe)
  except OSError as e:
    raise OutputPathError(f"{flag}={os.fspath(path)!r} cannot be written ({base}: {e.strerror or e})") from None


def check_output_dir(out: str | os.PathLike[str], *, marker: str, overwrite: bool, flag: str = "--out") -> str:
  """Checks an output directory before any work; returns its resolved path.

  Args:
    out: the directory the tool will (re)place.
    marker: the file name every output of this tool holds (e.g. rflow_jax_export.json); only a directory holding it
      may be replaced with `overwrite`.
    overwrite: whether the user asked to replace a non-empty `out`.
    flag: the flag name used in messages.

  Returns:
    The resolved absolute path of `out`.

  Raises:
    OutputPathError: naming the path and the reason (see the module docstring).
  """
  shown = os.fspath(out)
  target = real(out)
  run = enclosing_run(target)
  if run is not None:
    where = "is the training workdir" if run == target else f"is inside the training workdir {run!r}"
    raise OutputPathError(
        f"{flag}={shown!r} {where}; writing there could replace its checkpoints: " "choose a directory outside the run"
    )
  check_writable_dir(target, flag)
  if os.path.isdir(target) and os.listdir(target):
    if not overwrite:
      raise OutputPathError(
          f"{flag}={shown!r} exists and is not empty; pass --overwrite to replace a previous "
          "output there, or choose an empty directory"
      )
    nested = _nested_run(target)
    if nested is not None:
      raise OutputPathError(f"{flag}={shown!r} holds the training workdir {nested!r}; --overwrite would delete it")
    if not os.path.isfile(os.path.join(target, marker)):
      raise OutputPathError(
          f"{flag}={shown!r} is not empty and holds no {marker} (it is not an earlier output of "
          "this tool); --overwrite replaces only such a directory: choose another"
      )
  return target


def make_readable(path: str) -> None:
  """Gives a directory made by tempfile.mkdtemp (mode 0700) the permissions of a plain mkdir under the umask."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(path, 0o777 & ~umask)


def replace_dir(tmp: str | os.PathLike[str], out: str | os.PathLike[str]) -> None:
  """Renames the complete directory tmp to out, removing an existing out only once tmp is complete."""
  tmp, out = os.fspath(tmp), os.fspath(out)
  if os.path.exists(out):
    old = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.old-{os.getpid()}")
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old)
  else:
    os.rename(tmp, out)


@contextlib.contextmanager
def staged_dir(out: str):
  """Yields a new temporary sibling directory of `out` (readable like a mkdir); when the body succeeds it replaces
  `out` at once, and when it fails it is removed: readers never see a partial or mixed output."""
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
  make_readable(tmp)
  try:
    yield tmp
    replace_dir(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
