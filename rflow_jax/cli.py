"""What every command-line entry point shares: flag parsing and user errors as one line (`error: ...`, exit 2).

Every entry point runs as `app.run(main, flags_parser=cli.parse_flags)` and wraps its work in `cli.clean_errors()`.
Loading a run (config, model, weights, sampler) is library code: rflow_jax/rundir.py.
"""

import contextlib
import sys

from absl import flags

# Errors a user can cause with bad input; the CLIs print them as one line (no traceback) and exit 2.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, UnicodeDecodeError)


@contextlib.contextmanager
def clean_errors():
  """Turns user errors into `error: <message>` on stderr and exit status 2."""
  try:
    yield
  except USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv):
  """absl flag parsing with one-line errors: an unknown `--config.x` key or a value of the wrong type exits 2.

  Use as `app.run(main, flags_parser=parse_flags)`.
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
  except (AttributeError, KeyError) as e:  # ml_collections' report of an override naming no config field.
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    print(f"error: unknown config key {str(e).strip(chr(34))} in {' '.join(bad)}", file=sys.stderr)
  sys.exit(2)
