"""tasks.random_batch: the synthetic batch the benchmarks build from a task's batch_spec."""

import jax
import jax.numpy as jnp
import numpy as np

from rflow_jax.train import tasks


def test_random_batch_follows_the_spec_and_its_seed():
  spec = {
      "image": jax.ShapeDtypeStruct((2, 4, 4, 3), jnp.float32),
      "tokens": jax.ShapeDtypeStruct((2, 7), jnp.int32),
      "latent": jax.ShapeDtypeStruct((2, 2, 2, 16), jnp.bfloat16),
  }
  batch = tasks.random_batch(spec, vocab_size=5, seed=3)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {k: (s.shape, s.dtype) for k, s in spec.items()}
  assert -1 <= batch["image"].min() and batch["image"].max() <= 1 and batch["image"].std() > 0.3
  assert set(np.unique(batch["tokens"])) <= {1, 2, 3, 4}  # Never 0, the padding id.
  again, other = tasks.random_batch(spec, 5, seed=3), tasks.random_batch(spec, 5, seed=4)
  assert all(np.array_equal(batch[k], again[k]) for k in spec)
  assert not np.array_equal(batch["image"], other["image"])
