"""What every command-line entry point shares: flag parsing and user errors as one line (`error: ...`, exit 2).

Every entry point runs as `app.run(main, flags_parser=cli.parse_flags)` and wraps its work in `cli.clean_errors()`.
Loading a run (config, model, weights, sampler) is library code: rflow_jax/rundir.py.
"""

import contextlib
import errno
import sys

from absl import flags

from rflow_jax import config_lib
from rflow_jax.utils import host_memory

# Errors a user can cause with bad input; the CLIs print them as one line (no traceback) and exit 2.
USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    PermissionError,
    UnicodeDecodeError,
    FileExistsError,
    IsADirectoryError,
)
# OS errors a path given by the user causes (read-only filesystem, full disk, ...): also one line.
PATH_ERRNOS = (
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EEXIST,
    errno.ENOENT,
    errno.ENAMETOOLONG,
    errno.ELOOP,
)


@contextlib.contextmanager
def clean_errors():
  """Turns user errors into `error: <message>` on stderr and exit status 2."""
  try:
    yield
  except USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except OSError as e:
    if e.errno not in PATH_ERRNOS:
      raise
    print(f"error: {e.filename or ''}: {e.strerror or e}".replace("error: : ", "error: "), file=sys.stderr)
    sys.exit(2)


def quiet_orbax():
  """Orbax logs every file it reads or writes at INFO (~40 lines per restore, and a warning that a read-only manager
  skips saving): keep the console to our own lines and Orbax's real warnings."""
  import logging as py_logging  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top

  def keep(record):
    if "/orbax/" not in record.pathname:
      return True
    message = record.getMessage()  # Not the read-only notes: a sampler's manager is read-only by design.
    return record.levelno >= py_logging.WARNING and not any(
        note in message for note in ("read only", "read_only=True", "could not be restored")
    )

  logging.get_absl_handler().addFilter(keep)
  py_logging.getLogger().addFilter(keep)  # Before absl's handler is installed, Orbax goes to the root logger.


def parse_flags(argv):
  """absl flag parsing with one-line errors: an unknown `--config.x` key or a value of the wrong type exits 2.

  Use as `app.run(main, flags_parser=parse_flags)`. It is the first code `app.run` runs, after the imports and
  before JAX starts its threads, so it also applies $RFLOW_JAX_MALLOC (`host_memory.configure`: by default, where
  JAX can only use the CPU, freed host memory is kept for the next step).
  """
  try:
    host_memory.configure()
    config_lib.check_config_file(argv)  # A syntax error or no get_config(): one line, not a 50-line traceback.
    return flags.FLAGS(argv)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
  except ValueError as e:  # A bad $RFLOW_JAX_MALLOC.
    print(f"error: {e}", file=sys.stderr)
  except OSError as e:  # ml_collections: a config file that failed to load (its first line says why).
    print(f"error: --config: {str(e).splitlines()[0]}", file=sys.stderr)
  except (AttributeError, KeyError) as e:  # ml_collections' report of an override naming no config field.
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    print(f"error: unknown config key {str(e).strip(chr(34))} in {' '.join(bad)}", file=sys.stderr)
  sys.exit(2)
