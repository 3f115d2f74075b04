"""Analytic training FLOPs of the MM-DiT, and the throughput (TFLOP/s per device, MFU) the trainer logs.

Counted: multiply-adds of every matmul as 2 FLOPs, and the two attention matmuls. Per example and joint block, with
H the width, r the MLP ratio, T image tokens, L context tokens and N = T + L joint tokens:

  token matmuls (per stream s with n_s tokens):  2 · n_s · (3H² + H² + 2rH²)       qkv, proj, MLP
                                                  (the last block's context stream: 2 · L · 3H², qkv only)
  modulation (once per example, not per token):  2 · m · H²                        m = 6 (2 pre-only, 9 dual)
  joint attention:                                4 · N² · H                        QKᵀ and AV over all heads
  SD3.5 dual attention (image-only):             2 · T · 4H² + 4 · T² · H

plus patch embed (2·T·p²C·H), final projection (2·T·H·p²C_out), context embedder (2·L·D_ctx·H) and the t/y
embedder MLPs. A train step costs 3× the forward (the backward pass is two matmuls per forward matmul): the familiar
6 · params · tokens + 12 · depth · N² · H, with the MM-DiT twist that each stream's weights see only their own
tokens, 6 · (params_x · T + params_ctx · L) ≈ 3 · params · N, since the two streams hold about half the weights each.

These are *model* FLOPs: rematerialisation (model.remat) re-runs forward work that is not counted, so MFU is the
model FLOPs utilisation and the hardware does more (HFU). Elementwise work (norms, GELU, softmax, the optimizer)
and the frozen text encoders are not counted; XLA's cost analysis of the step (launch/aot_compile.py reports both)
is a few percent higher for that reason.
"""

import math
import re
import statistics
import time

from rflow_jax.model import native_attention, text_encoders


def forward_flops_per_example(
    *,
    hidden_size: int,
    depth: int,
    mlp_ratio: float,
    image_tokens: int,
    context_tokens: int,
    patch_features_in: int,
    patch_features_out: int,
    context_dim: int,
    pooled_dim: int,
    dual_attention_layers=(),
) -> dict[str, float]:
  """FLOPs of one MM-DiT forward pass on one example, split into matmul and attention terms.

  Args:
    hidden_size: H.
    depth: number of joint blocks (the last one's context stream is pre-only).
    mlp_ratio: MLP hidden / H.
    image_tokens: T = (image side / patch)².
    context_tokens: L, text tokens.
    patch_features_in: p²·C_in of the patch embed.
    patch_features_out: p²·C_out of the final projection.
    context_dim: width of the text tokens.
    pooled_dim: width of the pooled text vector.
    dual_attention_layers: indices of SD3.5 blocks with the extra image self-attention.

  Returns:
    {"matmul": ..., "attention": ..., "total": ...} in FLOPs.
  """
  h, t, l = hidden_size, image_tokens, context_tokens
  token_params = (4 + 2 * mlp_ratio) * h * h  # qkv 3H², proj H², MLP 2rH²
  matmul = attention = 0.0
  for i in range(depth):
    last = i == depth - 1
    dual = i in dual_attention_layers
    matmul += 2 * t * token_params + 2 * (l * 3 * h * h if last else l * token_params)
    matmul += 2 * h * h * ((9 if dual else 6) + (2 if last else 6))  # adaLN modulations of the two streams
    attention += 4 * (t + l) ** 2 * h
    if dual:
      matmul += 2 * t * 4 * h * h
      attention += 4 * t * t * h
  matmul += 2 * t * patch_features_in * h + 2 * t * h * patch_features_out + 2 * l * context_dim * h
  matmul += 2 * (256 * h + h * h) + 2 * (pooled_dim * h + h * h)  # t_embedder and y_embedder MLPs
  matmul += 2 * h * 2 * h  # final layer modulation
  return {"matmul": matmul, "attention": attention, "total": matmul + attention}


def _mmdit_dims(config) -> dict | None:
  """forward_flops_per_example's arguments for `config` (None for a backbone other than the MM-DiT)."""
  m = config.model
  if m.arch != "mmdit":
    return None
  _, n_context, d_context, d_pooled = text_encoders.dims(config.text)  # The text stack's token count and widths.
  return dict(
      hidden_size=m.hidden_size,
      depth=m.depth,
      mlp_ratio=m.mlp_ratio,
      image_tokens=(config.data.image_size // m.patch_size) ** 2,
      context_tokens=n_context,
      patch_features_in=m.patch_size**2 * m.in_channels,
      patch_features_out=m.patch_size**2 * m.in_channels,
      context_dim=d_context,
      pooled_dim=d_pooled,
      dual_attention_layers=tuple(m.dual_attention_layers),
  )


def forward_flops(config) -> dict[str, float] | None:
  """forward_flops_per_example of `config`'s MM-DiT ({"matmul", "attention", "total"}); None for other backbones."""
  dims = _mmdit_dims(config)
  return None if dims is None else forward_flops_per_example(**dims)


def train_flops_per_example(config) -> float | None:
  """Model FLOPs of training on one example (forward + backward, 3× the forward; the frozen text encoders, whose
  outputs SD3 precomputes, are not counted); None for a backbone other than the MM-DiT."""
  forward = forward_flops(config)
  return None if forward is None else 3.0 * forward["total"]


def compiled_step_flops(compiled, config) -> float:
  """FLOPs of a compiled train step of `config`: XLA's cost analysis, plus what it cannot see.

  XLA cannot look inside the native attention kernel's custom calls. When the program calls that kernel, attention's
  FLOPs are added as the einsum kernel's count has them: forward and backward, 3× the forward's two matmuls. That
  keeps GFLOP/s comparable across attention kernels. Nor can it see the fused native update
  (optim.update_impl="native"): its arithmetic, NATIVE_UPDATE_FLOPS per updated parameter, is added likewise.
  """
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0))
  forward = forward_flops(config)
  hlo = compiled.as_text()
  if forward is not None and native_attention.called_by(hlo):
    flops += 3.0 * forward["attention"] * config.train.global_batch_size
  return flops + NATIVE_UPDATE_FLOPS * native_update_params(hlo)


# The fused update's arithmetic per parameter (model/native/adamw_cpu.cc): clip 2, first moment 3, second moment 4,
# bias-corrected direction 5, weight decay 2, learning rate 1, param 1, EMA 3, update norm 2. XLA counts 24 for the
# same optax update.
NATIVE_UPDATE_FLOPS = 23
_UPDATE_CALL = re.compile(r"= \(([^)]*)\) custom-call\(.*custom_call_target=\"" + native_attention.TARGETS["adamw"])


def native_update_params(hlo_text: str) -> int:
  """Parameters the compiled program's fused native update calls update (0 where it makes none)."""
  total = 0
  for match in _UPDATE_CALL.finditer(hlo_text):
    # Results: (param, mu, nu, ema) per leaf, then the f32[1] update sum of squares.
    sizes = [math.prod(int(d) for d in dims.split(",") if d) for dims in re.findall(r"f32\[([\d,]*)\]", match.group(1))]
    total += (sum(sizes) - 1) // 4
  return total


def train_flops_per_step(config) -> float | None:
  """Model FLOPs of one training step of `config` (forward + backward over the global batch).

  Returns:
    The FLOPs, or None for a backbone other than the MM-DiT (model.arch), which this formula does not describe.
  """
  per_example = train_flops_per_example(config)
  return None if per_example is None else per_example * config.train.global_batch_size


def compute_axis(config, step: int) -> dict[str, float]:
  """Where `step` lies on the compute axis: {"examples": trained examples, "flops": their training FLOPs}.

  Every step has train.global_batch_size examples, so both are exact functions of the step (a resumed run logs the
  same values as an uninterrupted one); "flops" is absent for a backbone without a formula.
  """
  examples = float(step) * config.train.global_batch_size
  per_example = train_flops_per_example(config)
  return {"examples": examples} if per_example is None else {"examples": examples, "flops": examples * per_example}


def mmdit_param_count(
    *,
    hidden_size: int,
    depth: int,
    num_heads: int,
    mlp_ratio: float,
    qk_norm: str | None,
    patch_features_in: int,
    patch_features_out: int,
    context_dim: int,
    pooled_dim: int,
    pos_embed_max_size: int,
    dual_attention_layers=(),
    **unused,
) -> dict[str, int]:
  """Parameters of the MM-DiT, counted from its layer list (rflow_jax/model/mmdit.py; every Dense has a bias).

  Per block and stream: modulation H·mH + mH (m = 6; 9 with dual attention; 2 in the last block's pre-only context
  stream), qkv 3H² + 3H, qk-norm scales 2·H/heads, out projection H² + H, MLP 2rH² + rH + H (the pre-only stream has
  neither). Around the blocks: patch embed, the t (256 -> H -> H) and pooled (P -> H -> H) embedder MLPs, the context
  embedder, the final layer (modulation 2H, projection) and the frozen M²·H positional table.

  Returns:
    {"total": all parameters, "trainable": without the positional table (the optimizer freezes it),
     "blocks": the joint blocks alone}.
  """
  del unused  # Accepts _mmdit_dims' token counts, so one dict feeds both formulas.
  h, f = hidden_size, int(hidden_size * mlp_ratio)
  dense = lambda i, o: i * o + o
  norms = 2 * (h // num_heads) if qk_norm else 0
  attn = dense(h, 3 * h) + norms
  full = attn + dense(h, h) + dense(h, f) + dense(f, h)
  blocks = 0
  for i in range(depth):
    dual = i in dual_attention_layers
    blocks += full + dense(h, (9 if dual else 6) * h) + (attn + dense(h, h) if dual else 0)  # x stream
    blocks += attn + dense(h, 2 * h) if i == depth - 1 else full + dense(h, 6 * h)  # context stream
  outer = (
      dense(patch_features_in, h)
      + dense(256, h)
      + dense(h, h)
      + dense(pooled_dim, h)
      + dense(h, h)
      + dense(context_dim, h)
      + dense(h, 2 * h)
      + dense(h, patch_features_out)
  )
  table = pos_embed_max_size**2 * h
  return {"total": blocks + outer + table, "trainable": blocks + outer, "blocks": blocks}


def param_count(config) -> dict[str, int] | None:
  """mmdit_param_count of `config`'s MM-DiT (None for another backbone)."""
  dims = _mmdit_dims(config)
  if dims is None:
    return None
  m = config.model
  return mmdit_param_count(**dims, num_heads=m.num_heads, qk_norm=m.qk_norm, pos_embed_max_size=m.pos_embed_max_size)


class ThroughputMeter:
  """Wall time between metric fetches -> achieved TFLOP/s per device and MFU.

  The first window after a (re)start includes compilation, so it reports nothing; neither does a backbone without
  a FLOP formula (flops_per_step None). Windows include checkpoint saves and sample grids that fall in them.
  """

  def __init__(self, flops_per_step: float | None, num_devices: int, peak_tflops_per_device: float = 0.0):
    self.flops_per_step = flops_per_step
    self.num_devices = num_devices
    self.peak = peak_tflops_per_device
    self._last = None

  def measure(self, steps: int) -> dict[str, float]:
    """Call at each fetch with the number of steps since the previous one; returns the scalars to log."""
    now, last, self._last = time.perf_counter(), self._last, time.perf_counter()
    if last is None or steps <= 0 or not self.flops_per_step:
      return {}
    tflops = self.flops_per_step * steps / (now - last) / self.num_devices / 1e12
    out = {"tflops_per_device": tflops}
    if self.peak > 0:
      out["mfu"] = tflops / self.peak
    return out


def median_seconds(fn, reps: int) -> float:
  """Median wall seconds of `reps` calls of fn, which must wait for its own result (the benchmarks' step timer)."""
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)
