"""Validation of a resolved config: every cross-field constraint, in one place.

`validate` runs before anything is built or compiled, so a bad value costs one clear line, not a traceback after a
minute of compilation. Defaults are not here: they live in configs/base.py.
"""

import ast
import math
import os

import jax

from rflow_jax.data import buckets, registry as data_registry
from rflow_jax.flow import formulations
from rflow_jax.model import registry as model_registry
from rflow_jax.model import text_encoders
from rflow_jax.sampling import schedules, solvers
from rflow_jax.sharding import mesh as mesh_lib, partition, rules

NONFINITE_POLICIES = ("halt", "skip")


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field and the value."""


def _require(ok: bool, message: str):
  if not ok:
    raise ConfigError(message)


def validate(config) -> None:
  """Raises ConfigError naming the first bad field; checks cross-field constraints no flag parser can."""
  m, d, t = config.model, config.data, config.train
  validate_ranges(config)  # Finite and in range first: the checks below divide and compare these numbers.
  _require(
      d.name in data_registry.SOURCES, f"data.name={d.name!r} is not a dataset; valid: {sorted(data_registry.SOURCES)}"
  )
  _validate_buckets(config)
  if config.task == "flow":  # The backbone, text stack and formulation (another task checks its own).
    _require(
        m.patch_size > 0 and d.image_size % m.patch_size == 0,
        f"data.image_size={d.image_size} is not divisible by model.patch_size={m.patch_size}",
    )
    grid = d.image_size // m.patch_size
    _require(
        grid <= m.pos_embed_max_size,
        f"data.image_size={d.image_size} gives a {grid}×{grid} patch grid, larger than "
        f"model.pos_embed_max_size={m.pos_embed_max_size}",
    )
    _require(
        m.num_heads > 0 and m.hidden_size % m.num_heads == 0,
        f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}",
    )
    try:
      model_registry.check_arch(m.arch)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    _require(m.qk_norm in (None, "rms_norm"), f"model.qk_norm={m.qk_norm!r}; valid: None, 'rms_norm'")
    _require(m.dtype in model_registry.DTYPES, f"model.dtype={m.dtype!r}; valid: {sorted(model_registry.DTYPES)}")
    _require(
        config.text.width % config.text.num_heads == 0,
        f"text.width={config.text.width} is not divisible by text.num_heads={config.text.num_heads}",
    )
    _require(0.0 <= config.text.drop_prob < 1.0, f"text.drop_prob={config.text.drop_prob} must be in [0, 1)")
    try:
      text_encoders.validate(config.text)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    try:
      formulations.get(config.flow.formulation, shift=config.flow.shift)
    except ValueError as e:
      raise ConfigError(f"flow.formulation: {e}") from None
  for name in ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints", "global_batch_size"):
    _require(t[name] > 0, f"train.{name}={t[name]} must be positive")
  _require(t.sample_every >= 0, f"train.sample_every={t.sample_every} must be >= 0")
  _require(t.eval_every >= 0, f"train.eval_every={t.eval_every} must be >= 0")
  _require(
      t.init_from or not t.init_grow_depth,
      "train.init_grow_depth=True grows another run's weights: " "set train.init_from too",
  )
  _require(
      not (t.init_grow_depth and m.scan_blocks),
      "train.init_grow_depth=True places single blocks: set model.scan_blocks=False",
  )
  steps = tuple(t.profile_steps)
  _require(
      not steps or (len(steps) == 2 and all(isinstance(s, int) for s in steps) and 1 <= steps[0] <= steps[1]),
      f"train.profile_steps={steps!r} must be () (off) or (N, M) with 1 <= N <= M (1-based step numbers)",
  )
  _require(t.nonfinite in NONFINITE_POLICIES, f"train.nonfinite={t.nonfinite!r}; valid: {NONFINITE_POLICIES}")
  _require(
      t.global_batch_size % jax.process_count() == 0,
      f"train.global_batch_size={t.global_batch_size} is not divisible by the {jax.process_count()} processes",
  )
  _require(config.optim.warmup_steps >= 0, f"optim.warmup_steps={config.optim.warmup_steps} must be >= 0")
  _require(
      config.optim.decay in ("constant", "cosine", "wsd"),
      f"optim.decay={config.optim.decay!r}; valid: 'constant', 'cosine', 'wsd'",
  )
  _require(
      0.0 < config.optim.decay_fraction <= 1.0, f"optim.decay_fraction={config.optim.decay_fraction} must be in (0, 1]"
  )
  _require(
      config.optim.update_impl in ("optax", "native"),
      f"optim.update_impl={config.optim.update_impl!r}; valid: 'optax', 'native'",
  )
  _require(0.0 <= config.optim.ema_decay < 1.0, f"optim.ema_decay={config.optim.ema_decay} must be in [0, 1)")
  validate_sampling(config.sample)
  _validate_eval(config)
  validate_sharding(config)


def _validate_buckets(config) -> None:
  """data.buckets: pairs the backbone can train on, read by a source that knows each record's size."""
  d, m = config.data, config.model
  if not d.buckets:
    return
  _require(config.task == "flow", f"data.buckets={tuple(d.buckets)!r}: buckets train task='flow'; got {config.task!r}")
  try:
    if d.name == "precomputed":  # Pixel sizes; their latent grids are checked against the manifest (latent_data).
      buckets.check(d.buckets)
    else:
      buckets.check(d.buckets, patch_size=m.patch_size, pos_embed_max_size=m.pos_embed_max_size)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _require(
      d.name in data_registry.BUCKETED,
      f"data.buckets={tuple(d.buckets)!r} needs a dataset that stores each record's size: "
      f"data.name in {data_registry.BUCKETED}; got data.name={d.name!r}",
  )


def _validate_eval(config) -> None:
  """The validation-loss protocol's sizes (evaluator names are checked against eval/evaluators.py's registry by the
  trainer, before anything is built)."""
  e = config.eval
  _require(
      e.val_loss_batch_size > 0 and e.val_loss_examples > 0 and e.val_loss_examples % e.val_loss_batch_size == 0,
      f"eval.val_loss_examples={e.val_loss_examples} must be a positive multiple of "
      f"eval.val_loss_batch_size={e.val_loss_batch_size}",
  )
  # Its held-out examples are the procedural records past data.num_records; a converted or precomputed dataset has
  # none, and the evaluator would fail only after the whole training run.
  _require(
      "val_loss" not in config.train.evaluators or config.data.name == "shapes",
      f"train.evaluators={tuple(config.train.evaluators)} includes 'val_loss', which scores held-out shapes "
      f"records; data.name={config.data.name!r} has none (remove it from train.evaluators)",
  )


def validate_sharding(config, devices=None) -> None:
  """Rule names, mesh sizes against the devices (jax.devices() by default) and the batch split over the mesh."""
  try:
    logical_rules = rules.rules_from_config(config.sharding)
    mesh = mesh_lib.mesh_from_config(config.sharding, devices)
    partition.check_batch(config.train.global_batch_size, mesh, logical_rules)
    partition.check_microbatches(config.train.global_batch_size, config.train.microbatches, mesh, logical_rules)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def validate_sampling(sample) -> None:
  """Checks `config.sample` (also used by the sampling CLI for its flag overrides)."""
  # Non-finite: black PNGs. A pipeline's sampling settings have no ShapesEval fields: the fields it has are checked.
  fields = [r for r in RANGES if r[0].startswith("sample.") and r[0].removeprefix("sample.") in sample]
  validate_ranges({"sample": sample}, fields)
  _require(sample.solver in solvers.SOLVERS, f"sample.solver={sample.solver!r}; valid: {sorted(solvers.SOLVERS)}")
  _require(
      sample.schedule in schedules.STYLES, f"sample.schedule={sample.schedule!r}; valid: {sorted(schedules.STYLES)}"
  )
  _require(sample.batch_size > 0, f"sample.batch_size={sample.batch_size} must be positive")


def check_config_file(argv) -> None:
  """Raises ConfigError when the `--config=FILE[:arg]` in argv is missing, has a syntax error or no get_config().

  Static (compile + AST, nothing executed), so it runs before the flag parser imports the file.
  """
  path = None
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      path = arg[len("--config=") :]
    elif arg == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
  if not path:
    return
  path = path.split(":", 1)[0]
  if not os.path.isfile(path):
    raise ConfigError(f"--config={path!r}: no such file")
  with open(path, "rb") as f:
    source = f.read()
  try:
    tree = ast.parse(source, filename=path)
  except SyntaxError as e:
    raise ConfigError(f"--config={path!r} has a syntax error at line {e.lineno}: {e.msg}") from None
  if not any(isinstance(n, ast.FunctionDef) and n.name == "get_config" for n in tree.body):
    raise ConfigError(
        f"--config={path!r} defines no get_config() function (a config file returns its ConfigDict "
        "from get_config(); see configs/quickstart.py)"
    )


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# (field, test, what it must be): every number the code reads, checked before anything is built.
_POSITIVE = lambda x: _finite(x) and x > 0
_NON_NEGATIVE = lambda x: _finite(x) and x >= 0
_UNIT = lambda x: _finite(x) and 0 <= x < 1
RANGES = (
    ("data.image_size", _POSITIVE, "positive (pixels)"),
    ("data.num_records", _POSITIVE, "positive"),
    ("data.worker_count", _NON_NEGATIVE, ">= 0"),
    ("text.max_length", lambda x: _finite(x) and x >= 3, ">= 3 (BOS, a word, EOS)"),
    ("text.width", _POSITIVE, "positive"),
    ("text.depth", _POSITIVE, "positive"),
    ("text.num_heads", _POSITIVE, "positive"),
    ("model.patch_size", _POSITIVE, "positive"),
    ("model.in_channels", _POSITIVE, "positive"),
    ("model.hidden_size", _POSITIVE, "positive"),
    ("model.depth", _POSITIVE, "positive"),
    ("model.num_heads", _POSITIVE, "positive"),
    ("model.mlp_ratio", _POSITIVE, "positive and finite"),
    ("model.pos_embed_max_size", _POSITIVE, "positive"),
    ("flow.shift", _POSITIVE, "positive and finite"),
    ("optim.learning_rate", _POSITIVE, "positive and finite"),
    ("optim.b1", _UNIT, "in [0, 1)"),
    ("optim.b2", _UNIT, "in [0, 1)"),
    ("optim.eps", _POSITIVE, "positive and finite"),
    ("optim.weight_decay", _NON_NEGATIVE, ">= 0 and finite"),
    ("optim.grad_clip_norm", _NON_NEGATIVE, ">= 0 and finite (0 disables clipping)"),
    ("optim.ema_decay", _UNIT, "in [0, 1)"),
    ("train.peak_tflops_per_device", _NON_NEGATIVE, ">= 0 and finite"),
    ("sample.num_steps", _POSITIVE, "positive"),
    ("sample.cfg_scale", _NON_NEGATIVE, ">= 0 and finite (1 = no guidance)"),
    ("sample.shift", _POSITIVE, "positive and finite"),
    ("sample.batch_size", _POSITIVE, "positive"),
    ("sample.eval_per_kind", _POSITIVE, "positive"),
)


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def validate_ranges(config, fields=RANGES) -> None:
  """Raises ConfigError naming the first field of `fields` that is not finite or outside its range."""
  for name, ok, what in fields:
    value = _get(config, name)
    _require(ok(value), f"{name}={value!r} must be {what}")
