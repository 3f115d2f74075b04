"""Shared pieces of the command-line entry points: one-line errors, and a sampler rebuilt from a workdir."""

import contextlib
import errno
import json
import os
import sys

import ml_collections

# Errors a user can cause with bad input; the CLIs print them as one line (no traceback) and exit 2.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, UnicodeDecodeError,
               FileExistsError, IsADirectoryError)
# OS errors a path given by the user causes (read-only filesystem, full disk, ...): also one line.
PATH_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR,
               errno.EEXIST, errno.ENOENT, errno.ENAMETOOLONG, errno.ELOOP)


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
        note in message for note in ("read only", "read_only=True", "could not be restored"))
  logging.get_absl_handler().addFilter(keep)
  py_logging.getLogger().addFilter(keep)  # Before absl's handler is installed, Orbax goes to the root logger.


def parse_flags(argv):
  """absl flag parsing with one-line errors: an unknown `--config.x` key or a value of the wrong type exits 2.

  Use as `app.run(main, flags_parser=parse_flags)`.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  from rflow_jax import config_lib  # pylint: disable=g-import-not-at-top
  try:
    config_lib.check_config_file(argv)  # A syntax error or no get_config(): one line, not a 50-line traceback.
    return flags.FLAGS(argv)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
  except OSError as e:  # ml_collections: a config file that failed to load (its first line says why).
    print(f"error: --config: {str(e).splitlines()[0]}", file=sys.stderr)
  except (AttributeError, KeyError) as e:  # ml_collections' report of an override naming no config field.
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    print(f"error: unknown config key {str(e).strip(chr(34))} in {' '.join(bad)}", file=sys.stderr)
  sys.exit(2)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a training run saved to WORKDIR/config.json."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--workdir={workdir!r} has no config.json: not a rflow_jax training workdir")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_sampler(workdir: str, *, steps=None, cfg=None, solver=None, use_ema: bool = True,
                 transformer: str | None = None):
  """Rebuilds (sampler, params, text_params, config, step) from a workdir without importing the trainer.

  With `transformer` (a diffusers SD3Transformer2DModel directory) its model and weights replace the workdir's
  MM-DiT; the workdir still gives the config and the text encoders' weights.
  """
  from rflow_jax import config_lib  # pylint: disable=g-import-not-at-top
  from rflow_jax.flow import formulations  # pylint: disable=g-import-not-at-top
  from rflow_jax.model import text_encoders  # pylint: disable=g-import-not-at-top
  from rflow_jax.sampling import pipeline  # pylint: disable=g-import-not-at-top
  from rflow_jax.train import checkpoint  # pylint: disable=g-import-not-at-top

  config = load_config(workdir)
  if steps is not None:
    config.sample.num_steps = steps
  if cfg is not None:
    config.sample.cfg_scale = cfg
  if solver is not None:
    config.sample.solver = solver
  config.sample.use_ema = use_ema
  config_lib.validate_sampling(config.sample)  # Before restoring or compiling anything.
  model = config_lib.build_model(config)
  if transformer is not None:  # Checked against the run's text stack before the checkpoint is read.
    from rflow_jax.export import workdir as export_workdir  # pylint: disable=g-import-not-at-top
    model, transformer_params = export_workdir.load_transformer_for(transformer, config)
  params, text_params, step = checkpoint.restore_params(workdir, use_ema=use_ema)
  if transformer is not None:
    params = transformer_params
  tokenizer, text_stack = text_encoders.build(config.text)
  sampler = pipeline.Sampler(
      model=model, text_stack=text_stack, tokenizer=tokenizer,
      formulation=formulations.get(config.flow.formulation, shift=config.flow.shift), sample_config=config.sample,
      image_shape=(config.data.image_size, config.data.image_size, config.model.in_channels))
  return sampler, params, text_params, config, step
