"""Memory pre-flight (rflow_jax/train/preflight.py) and the step profiler (rflow_jax/train/profiler.py)."""

import glob
import os
import types

import jax
import jax.numpy as jnp
import pytest

from configs import debug
from rflow_jax import config_lib
from rflow_jax.train import preflight, profiler, trainer

GIB = 2**30


def test_refusal_names_the_estimate_the_limit_and_what_would_fit():
  # 100 GiB needed on an 80 GB device: 10 GiB state (+2.5 GiB gradients) and 87.5 GiB that scale with the 64
  # examples a device processes at once; 2 microbatches give 12.5 + 43.75 = 56.25 GiB.
  with pytest.raises(preflight.InsufficientMemoryError) as e:
    preflight.check(
        needed=100 * GIB,
        limit=80 * 10**9,
        source="XLA:CPU estimate",
        state=10 * GIB,
        microbatches=1,
        examples_per_shard=64,
        remat="dots_no_batch",
        fsdp=64,
    )
  assert str(e.value) == (
      "the train step needs 100.0 GiB per device (XLA:CPU estimate), more than the 74.5 GiB (80.0 GB) available; "
      "would fit: --config.train.microbatches=2 (32 examples per device at once, ≈56.2 GiB by linear scaling); "
      "--config.model.remat=full (saves only each block's input; ~1/3 more FLOPs); "
      "a larger fsdp axis over more devices (fsdp=128, 2× the devices: ≈50.0 GiB)"
  )
  assert "\n" not in str(e.value) and isinstance(e.value, ValueError)  # One line; the CLIs print it and exit 2.


def test_state_alone_too_big_asks_for_more_fsdp_only():
  with pytest.raises(
      preflight.InsufficientMemoryError,
      match=r"would fit: a larger fsdp axis over more devices " r"\(fsdp=16, 2× the devices: ≈75.0 GiB\)$",
  ):
    preflight.check(
        needed=150 * GIB,
        limit=80 * GIB,
        source="x",
        state=100 * GIB,
        microbatches=1,
        examples_per_shard=8,
        remat="full",
        fsdp=8,
    )


def test_fits_passes_and_cpu_has_no_limit():
  preflight.check(needed=10, limit=10, source="x", state=1, microbatches=1, examples_per_shard=1, remat="none", fsdp=1)
  assert preflight.device_limit(jax.devices()[0]) is None  # The trainer checks on TPU/GPU only.
  gpu = types.SimpleNamespace(platform="gpu", memory_stats=lambda: {"bytes_limit": 85 * 10**9})
  assert preflight.device_limit(gpu) == 85 * 10**9


@pytest.mark.slow
def test_trainer_preflight_refuses_before_the_first_step(tmp_path, monkeypatch):
  # The real path on CPU: the debug step compiled, its memory analysis against a pretend 1 KB device.
  monkeypatch.setattr(preflight, "device_limit", lambda device: 1000)
  with pytest.raises(
      preflight.InsufficientMemoryError,
      match=r"^the train step needs 0.0 GiB per device "
      r"\(compiled memory analysis\), more than the 0.0 GiB \(0.0 GB\) available; would fit: ",
  ):
    trainer.train_and_evaluate(debug.get_config(), str(tmp_path))
  assert not glob.glob(str(tmp_path / "checkpoints" / "*"))  # Refused before any step.


def test_profiler_traces_exactly_its_window(tmp_path):
  prof = profiler.StepProfiler((2, 3), str(tmp_path))
  f = jax.jit(lambda x: jnp.tanh(x @ x))
  x = jnp.ones((64, 64))
  started = []
  for step in range(1, 6):
    prof.before(step, x)
    started.append(prof.active)
    x = f(x)
    prof.after(step, x)
  assert started == [False, True, True, False, False]
  traces = glob.glob(os.path.join(tmp_path, "profile", "plugins", "profile", "*", "*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0


def test_profile_steps_are_validated():
  c = debug.get_config()
  c.train.profile_steps = (3, 2)
  with pytest.raises(
      config_lib.ConfigError,
      match=r"^train.profile_steps=\(3, 2\) must be \(\) \(off\) or \(N, M\) "
      r"with 1 <= N <= M \(1-based step numbers\)$",
  ):
    config_lib.validate(c)
