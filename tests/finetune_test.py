"""Fine-tuning from a pipeline (train.init_from="pipeline:D"): step 0's loss against diffusers', resume, refusals."""

import json
import os

import jax
import numpy as np
import pytest
import torch
from PIL import Image

import cli_util  # tests/cli_util.py (pytest puts tests/ on sys.path)
import pipeline_util as pu
from configs import debug
from rflow_jax import precompute
from rflow_jax.data import convert, shapes
from rflow_jax.flow import losses
from rflow_jax.model import mmdit_tree, registry
from rflow_jax.train import finetune, step as step_lib, tasks, trainer

LOSS_PARITY = 1e-4  # |step 0's loss - diffusers' loss on the same batch, t and noise|, fp32.
PIXELS = pu.LATENT * 2  # The tiny VAE halves the side.


@pytest.fixture(scope="module")
def pipeline_and_records(tmp_path_factory):
  """(a tiny random diffusers pipeline D, records of 8 shapes images encoded with D's VAE and text encoders)."""
  root = tmp_path_factory.mktemp("finetune")
  pu.tiny_diffusers_pipeline(root / "D")
  source = shapes.ShapesSource(size=32, seed=0, num_records=8, caption_style="sentence")
  os.makedirs(root / "in")
  lines = []
  for i in range(len(source)):
    Image.fromarray(source[i]["image"]).save(root / "in" / f"{i:03d}.png")
    lines.append(json.dumps({"file_name": f"{i:03d}.png", "text": source[i]["caption"]}) + "\n")
  (root / "in" / "metadata.jsonl").write_text("".join(lines))
  convert.convert(convert.Options("imagefolder", str(root / "in"), str(root / "converted"), records_per_shard=4))
  c = debug.get_config()
  c.data.name, c.data.path, c.data.image_size = "arrayrecord", str(root / "converted"), PIXELS
  c.vae.path, c.text.encoders, c.text.sd3_path, c.text.t5_length = str(root / "D"), "sd3", str(root / "D"), pu.T5_LENGTH
  c.precompute.latent_dtype = c.precompute.text_dtype = "float32"
  c.precompute.batch_size = 4
  precompute.run(c, str(root / "records"))
  return str(root / "D"), str(root / "records")


def _config(pipeline, records, **overrides):
  """A fine-tune of the tiny pipeline: its transformer's fields (3 blocks of width 16, qk-norm, 8² table)."""
  c = debug.get_config()
  c.data.name, c.data.path, c.data.image_size = "precomputed", records, pu.LATENT
  c.model.in_channels, c.model.patch_size, c.model.depth, c.model.hidden_size = 4, 2, 3, 16
  c.model.num_heads, c.model.pos_embed_max_size, c.model.qk_norm = 2, 8, "rms_norm"
  c.text.encoders, c.text.t5_length, c.text.drop_prob = "sd3", pu.T5_LENGTH, 0.3
  c.train.init_from = f"pipeline:{pipeline}"
  c.train.global_batch_size, c.train.num_steps, c.train.log_every, c.train.checkpoint_every = 4, 1, 1, 1
  c.train.evaluators, c.train.eval_at_end = (), False
  for key, value in overrides.items():
    section, leaf = key.split(".")
    c[section][leaf] = value
  return c


def _diffusers_loss(pipeline, x0, context, pooled, t, eps) -> float:
  """The rectified-flow loss mean ‖v − (ε − x0)‖² of diffusers' transformer at z_t = (1 − t)·x0 + t·ε (NCHW)."""
  import diffusers  # pylint: disable=g-import-not-at-top

  model = diffusers.SD3Transformer2DModel.from_pretrained(pipeline, subfolder="transformer").eval()
  to_nchw = lambda x: torch.from_numpy(np.asarray(x, np.float32).transpose(0, 3, 1, 2).copy())
  x0, eps, t = to_nchw(x0), to_nchw(eps), torch.from_numpy(np.array(t, np.float32))
  z_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
  with torch.no_grad():
    v = model(
        hidden_states=z_t,
        timestep=1000 * t,
        encoder_hidden_states=torch.from_numpy(np.array(context, np.float32)),
        pooled_projections=torch.from_numpy(np.array(pooled, np.float32)),
    ).sample
  return float(((v - (eps - x0)) ** 2).mean())


@pytest.mark.slow
def test_step0_loss_equals_diffusers_and_a_resume_ignores_the_pipeline(pipeline_and_records, tmp_path, monkeypatch):
  pipeline, records = pipeline_and_records
  config = _config(pipeline, records)
  config.train.preview_at_end = False  # Sampling is tested elsewhere.
  results = trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert results["step"] == 1
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  assert saved["text"]["sd3_path"] == saved["vae"]["path"] == os.path.abspath(pipeline)  # Filled from init_from.
  # Step 0's batch and draws, as the step made them: the first global batch, key fold_in(key(seed), 0).
  task = tasks.get_task(finetune.resolve(config))
  batch = next(task.make_iterator(0, 1))
  key = jax.random.fold_in(jax.random.key(config.seed), 0)
  x0, context, pooled = step_lib.stored_inputs(batch, key, task.latents.stored_inputs(), config.text.drop_prob)
  t, eps = losses.draw_noise(task.formulation, jax.random.split(key)[1], x0.shape)
  expected = _diffusers_loss(pipeline, x0, context, pooled, t, eps)
  print(
      f"step 0 loss: rflow_jax {results['loss']:.8g}, diffusers {expected:.8g}, |diff| {abs(results['loss'] - expected):.1e}"
  )
  assert abs(results["loss"] - expected) <= LOSS_PARITY
  assert float(np.abs(np.asarray(context)).max()) > 0.1  # Conditioned: the pooled and context are not all dropped.

  # A restart of the workdir resumes its checkpoint: the pipeline's weights are not read again.
  def not_read(*_):
    raise AssertionError("a resumed run read the pipeline's weights")

  monkeypatch.setattr(finetune, "initial_params", not_read)
  config.train.num_steps = 2
  assert trainer.train_and_evaluate(config, str(tmp_path / "run"))["step"] == 2


def test_configs_that_disagree_with_the_pipeline_are_refused_before_anything(pipeline_and_records, tmp_path):
  pipeline, records = pipeline_and_records
  cases = [
      ({"model.depth": 2}, "model.depth=2, but the pipeline's", "num_layers=3"),
      ({"model.qk_norm": None}, "model.qk_norm=None", "qk_norm='rms_norm'"),
      ({"model.dual_attention_layers": (0,)}, "model.dual_attention_layers=(0,)", "dual_attention_layers=()"),
      ({"model.pos_embed_max_size": 16}, "model.pos_embed_max_size=16", "pos_embed_max_size=8"),
      ({"vae.path": records}, "vae.path=", "leave vae.path empty"),
      ({"text.encoders": "tiny"}, "set --config.text.encoders=sd3"),
      ({"train.init_grow_depth": True, "model.scan_blocks": False}, "a pipeline keeps its depth"),
      ({"data.name": "shapes"}, "not data.name='shapes'"),
      ({"train.init_from": "pipeline:" + str(tmp_path / "nowhere")}, "nowhere"),
  ]
  for overrides, *needles in cases:
    with pytest.raises((finetune.FinetuneError, FileNotFoundError)) as e:
      trainer.train_and_evaluate(_config(pipeline, records, **overrides), str(tmp_path / "run"))
    assert "\n" not in str(e.value) and all(n in str(e.value) for n in needles), (overrides, str(e.value))
    assert not os.path.exists(tmp_path / "run"), overrides  # Nothing written.


def test_command_line_refusal_is_one_line(pipeline_and_records, tmp_path):
  pipeline, records = pipeline_and_records
  flags = [f"--config.{k}={v}" for k, v in {**_overrides(pipeline, records), "model.depth": 5}.items()]
  rc, _, stderr = cli_util.run_module(
      "rflow_jax.main", "--config=configs/debug.py", f"--workdir={tmp_path / 'w'}", *flags
  )
  cli_util.assert_one_line_error(rc, stderr, "model.depth=5", "transformer/config.json has num_layers=3")
  assert not os.path.exists(tmp_path / "w")


def _overrides(pipeline, records) -> dict:
  """_config's fields as command-line overrides of configs/debug.py."""
  c, base = _config(pipeline, records), debug.get_config()
  flat = lambda d: {f"{s}.{k}": v for s in d for k, v in (d[s].items() if hasattr(d[s], "items") else ())}
  return {k: v for k, v in flat(c).items() if flat(base).get(k) != v and not isinstance(v, tuple)}


def test_a_scanned_model_reads_the_same_weights_stacked(pipeline_and_records):
  pipeline, records = pipeline_and_records
  outputs = []
  for scan in (False, True):
    config = finetune.resolve(_config(pipeline, records, **{"model.scan_blocks": scan}))
    model = registry.build_model(config)
    x, t, context, pooled = registry.dummy_inputs(config, batch_size=2)
    rng = np.random.RandomState(0)
    x, context = rng.randn(*x.shape).astype(np.float32), rng.randn(*context.shape).astype(np.float32)
    pooled, t = rng.randn(*pooled.shape).astype(np.float32), np.array([0.3, 0.8], np.float32)
    params = finetune.initial_params(config, model)
    # Scanned: blocks 0-1 stacked as one group (the last block, context-pre-only, is its own).
    assert (mmdit_tree.block_name(0, 2) in params) == scan
    outputs.append(jax.jit(model.apply)({"params": params}, x, t, context, pooled))  # Half the CPU of op by op.
  np.testing.assert_allclose(outputs[1], outputs[0], rtol=0, atol=1e-5)
  assert float(np.abs(outputs[0]).max()) > 0.1
