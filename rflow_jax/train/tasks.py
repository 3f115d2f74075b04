"""What is trained: task plug-ins behind `config.task`. The trainer owns mesh, jit, loop, checkpoints and logging.

A task builds its modules and optimizer(s) from the config (compiling nothing) and provides:
  init(key) -> state          a flax.struct.dataclass with at least `step` and `skipped_steps` (int32 scalars);
                              params may still carry nn.Partitioned logical-axis boxes (the trainer derives the
                              shardings from them).
  weight_groups               the state fields holding weights (compatibility checks, warm starts, export).
  train_step(state, batch)    pure and jittable -> (state, metrics); metrics are device scalars and include "loss"
                              and "nonfinite" (1.0 when the update was dropped).
  batch_spec(global_batch)    {key: jax.ShapeDtypeStruct} of the global arrays the step reads.
  buckets                     the data.buckets plan (data/buckets.py: sizes, records per bucket, per-step draw), or
                              None: every batch has batch_spec's shapes. With a plan, batch_spec(global_batch,
                              (height, width)) gives each bucket's shapes and the trainer compiles one step for each.
  make_iterator(pi, pc, start)  an iterator of process-local numpy batches (keys ⊇ batch_spec), beginning at global
                              stream position `start` (examples all processes together consumed before; the
                              trainer checkpoints that number, so a run resumes with any process count).
  preview(state, step, workdir, writer)  periodic images (TensorBoard + WORKDIR/samples/).
  flops_per_step              model FLOPs of one step (None: unknown; no TFLOP/s or MFU is logged).

TASKS maps config.task to the class; other modules add theirs (e.g. the autoencoder's "vae").
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from rflow_jax import config_lib
from rflow_jax.data import buckets as buckets_lib, pipeline as data_pipeline, registry as data_registry
from rflow_jax.flow import formulations
from rflow_jax.model import registry as model_registry
from rflow_jax.model import text_encoders
from rflow_jax.sampling import pipeline as sampling
from rflow_jax.train import latent_data, native_update, optimizer as optim_lib, step as step_lib, vae_task
from rflow_jax.train.state import TrainState
from rflow_jax.utils import flops as flops_lib


class FlowTask:
  """The rectified-flow backbone (config.model) on frozen text encoders (config.text), with EMA weights."""

  weight_groups = ("params", "ema_params", "text_params")

  def __init__(self, config):
    """Builds backbone, text stack, formulation and optimizer; compiles nothing."""
    self.config = config
    self.model = model_registry.build_model(config)
    self.tokenizer, self.text_stack = text_encoders.build(config.text)
    self.formulation = formulations.get(config.flow.formulation, shift=config.flow.shift)
    self.tx = optim_lib.make_optimizer(config.optim, config.train.num_steps)
    schedule = optim_lib.learning_rate_schedule(config.optim, config.train.num_steps)
    fused = None
    if config.optim.update_impl == "native":
      fused = functools.partial(native_update.update, optim_config=config.optim, learning_rate=schedule)
    # Precomputed latents and embeddings: the manifest is checked against this run here, before any compilation.
    self.latents = None
    if config.data.name == "precomputed":
      self.latents = latent_data.LatentData(
          config, self.text_stack, self.tokenizer, text_encoders.init_params(self.text_stack, config.text)
      )
    self.train_step = functools.partial(
        step_lib.train_step,
        model=self.model,
        text_stack=self.text_stack,
        formulation=self.formulation,
        tx=self.tx,
        learning_rate=schedule,
        seed=config.seed,
        drop_prob=config.text.drop_prob,
        ema_decay=config.optim.ema_decay,
        microbatches=config.train.microbatches,
        stored=self.latents and self.latents.stored_inputs(),
        empty_tokens=text_encoders.drop_tokens(config.text, self.tokenizer),
        native_update=fused,
    )
    self.flops_per_step = flops_lib.train_flops_per_step(config)

  def init(self, key) -> TrainState:
    """Fresh state; the backbone's params keep their logical-axis boxes (the trainer unboxes them)."""
    params = self.model.init(key, *model_registry.dummy_inputs(self.config))["params"]
    text_params = text_encoders.init_params(self.text_stack, self.config.text)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=self.tx.init(params),
        ema_params=jax.tree.map(lambda p: p, params),
        text_params=text_params,
        skipped_steps=jnp.zeros((), jnp.int32),
    )

  @functools.cached_property
  def source(self):
    """The random-access source of config.data (built once: an arrayrecord source hashes every shard)."""
    return data_registry.make_source(self.config.data)

  @functools.cached_property
  def buckets(self) -> buckets_lib.Plan | None:
    """The data.buckets plan (None when off); reads every record's stored size on first use."""
    c = self.config
    if not c.data.buckets:
      return None
    return buckets_lib.Plan(
        sizes=buckets_lib.sizes(c.data.buckets),
        assignment=self.source.assignment,
        seed=c.seed,
        global_batch_size=c.train.global_batch_size,
    )

  def batch_spec(self, global_batch_size: int, size: tuple[int, int] | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """Images in [-1, 1] (NHWC; (height, width) = `size`, default data.image_size square) and the caption tokens; or
    the precomputed records' arrays (latents of that bucket)."""
    if self.latents:
      return self.latents.batch_spec(global_batch_size, size)
    h, w = size or (self.config.data.image_size,) * 2
    c = self.config.model.in_channels
    return {
        "image": jax.ShapeDtypeStruct((global_batch_size, h, w, c), jnp.float32),
        "tokens": jax.ShapeDtypeStruct((global_batch_size, text_encoders.dims(self.config.text)[0]), jnp.int32),
    }

  def make_iterator(self, process_index: int, process_count: int, start: int = 0):
    """This process's slice of the shuffled, tokenized training stream of config.data, from global position `start`."""
    c = self.config
    return data_pipeline.make_train_iterator(
        source=self.source,
        tokenize=None if self.latents else self.tokenizer,
        global_batch_size=c.train.global_batch_size,
        seed=c.seed,
        process_index=process_index,
        process_count=process_count,
        worker_count=c.data.worker_count,
        start=start,
        plan=self.buckets,
    )

  @functools.cached_property
  def sampler(self) -> sampling.Sampler:
    """The sampler of this task's modules and config.sample (built, and compiled, on first use)."""
    vae = self.latents and (self.latents.vae_model, self.latents.vae_params)  # Latent samples are decoded.
    return sampling.Sampler.from_config(
        self.config, model=self.model, text_stack=self.text_stack, tokenizer=self.tokenizer, vae=vae
    )

  def preview(self, state, step: int, workdir: str, writer) -> None:
    """The sample grid of config.sample.grid_prompts, to TensorBoard and WORKDIR/samples/grid_<step>.png."""
    self.sampler.write_grid(state, step, workdir, writer)


TASKS = {"flow": FlowTask, "vae": vae_task.VAETask}
# Checks of a task's own config section, beyond config_lib.validate (which checks the flow task's fields).
_VALIDATORS = {"vae": vae_task.validate}


def validate(config) -> None:
  """Raises config_lib.ConfigError naming an unknown config.task or the first bad field of the task's section."""
  if config.task not in TASKS:
    raise config_lib.ConfigError(f"task={config.task!r}; valid: {sorted(TASKS)}")
  if config.task in _VALIDATORS:
    _VALIDATORS[config.task](config)


def get_task(config):
  """The task of config.task, built from the config; ValueError naming an unknown task."""
  if config.task not in TASKS:
    raise ValueError(f"task={config.task!r}; valid: {sorted(TASKS)}")
  return TASKS[config.task](config)


def random_batch(spec: dict[str, jax.ShapeDtypeStruct], vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A host batch of `spec`'s shapes (a task's batch_spec) from one seeded draw, for benchmarks and smoke runs.

  Floating arrays are uniform in [-1, 1] (the pixel range; latents and text states get the same), integer arrays
  token ids in [1, vocab_size) (0 is padding). Drawn in the spec's key order, so one seed gives one batch.
  """
  rng = np.random.RandomState(seed)
  out = {}
  for key, s in spec.items():
    if jnp.issubdtype(s.dtype, jnp.integer):
      out[key] = rng.randint(1, vocab_size, s.shape).astype(s.dtype)
    else:
      out[key] = rng.uniform(-1, 1, s.shape).astype(s.dtype)
  return out
