"""Validation of a resolved config: every cross-field constraint, in one place.

`validate` runs before anything is built or compiled, so a bad value costs one clear line, not a traceback after a
minute of compilation. Defaults are not here: they live in configs/base.py.
"""

import jax

from rflow_jax.data import registry as data_registry
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
  _require(d.name in data_registry.SOURCES, f"data.name={d.name!r} is not a dataset; valid: {sorted(data_registry.SOURCES)}")
  if config.task == "flow":  # The backbone, text stack and formulation (another task checks its own).
    _require(m.patch_size > 0 and d.image_size % m.patch_size == 0,
             f"data.image_size={d.image_size} is not divisible by model.patch_size={m.patch_size}")
    grid = d.image_size // m.patch_size
    _require(grid <= m.pos_embed_max_size,
             f"data.image_size={d.image_size} gives a {grid}×{grid} patch grid, larger than "
             f"model.pos_embed_max_size={m.pos_embed_max_size}")
    _require(m.num_heads > 0 and m.hidden_size % m.num_heads == 0,
             f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}")
    try:
      model_registry.check_arch(m.arch)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    _require(m.qk_norm in (None, "rms_norm"), f"model.qk_norm={m.qk_norm!r}; valid: None, 'rms_norm'")
    _require(m.dtype in model_registry.DTYPES, f"model.dtype={m.dtype!r}; valid: {sorted(model_registry.DTYPES)}")
    _require(config.text.width % config.text.num_heads == 0,
             f"text.width={config.text.width} is not divisible by text.num_heads={config.text.num_heads}")
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
  _require(t.init_from or not t.init_grow_depth, "train.init_grow_depth=True grows another run's weights: "
           "set train.init_from too")
  _require(not (t.init_grow_depth and m.scan_blocks),
           "train.init_grow_depth=True places single blocks: set model.scan_blocks=False")
  steps = tuple(t.profile_steps)
  _require(not steps or (len(steps) == 2 and all(isinstance(s, int) for s in steps) and 1 <= steps[0] <= steps[1]),
           f"train.profile_steps={steps!r} must be () (off) or (N, M) with 1 <= N <= M (1-based step numbers)")
  _require(t.nonfinite in NONFINITE_POLICIES, f"train.nonfinite={t.nonfinite!r}; valid: {NONFINITE_POLICIES}")
  _require(t.global_batch_size % jax.process_count() == 0,
           f"train.global_batch_size={t.global_batch_size} is not divisible by the {jax.process_count()} processes")
  _require(config.optim.warmup_steps >= 0, f"optim.warmup_steps={config.optim.warmup_steps} must be >= 0")
  _require(config.optim.decay in ("constant", "cosine", "wsd"),
           f"optim.decay={config.optim.decay!r}; valid: 'constant', 'cosine', 'wsd'")
  _require(0.0 < config.optim.decay_fraction <= 1.0,
           f"optim.decay_fraction={config.optim.decay_fraction} must be in (0, 1]")
  _require(0.0 <= config.optim.ema_decay < 1.0, f"optim.ema_decay={config.optim.ema_decay} must be in [0, 1)")
  validate_sampling(config.sample)
  _validate_eval(config)
  validate_sharding(config)


def _validate_eval(config) -> None:
  """The validation-loss protocol's sizes (evaluator names are checked against eval/evaluators.py's registry by the
  trainer, before anything is built)."""
  e = config.eval
  _require(e.val_loss_batch_size > 0 and e.val_loss_examples > 0
           and e.val_loss_examples % e.val_loss_batch_size == 0,
           f"eval.val_loss_examples={e.val_loss_examples} must be a positive multiple of "
           f"eval.val_loss_batch_size={e.val_loss_batch_size}")


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
  _require(sample.num_steps > 0, f"sample.num_steps={sample.num_steps} must be positive")
  _require(sample.cfg_scale >= 0, f"sample.cfg_scale={sample.cfg_scale} must be >= 0 (1 = no guidance)")
  _require(sample.shift > 0, f"sample.shift={sample.shift} must be positive")
  _require(sample.solver in solvers.SOLVERS, f"sample.solver={sample.solver!r}; valid: {sorted(solvers.SOLVERS)}")
  _require(sample.schedule in schedules.STYLES,
           f"sample.schedule={sample.schedule!r}; valid: {sorted(schedules.STYLES)}")
  _require(sample.batch_size > 0, f"sample.batch_size={sample.batch_size} must be positive")
