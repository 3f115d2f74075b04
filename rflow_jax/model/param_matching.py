"""Parameter-matched widths: the width at which each backbone of the registry has as many parameters as the MM-DiT.

Trainable parameters (without the fixed `pos_embed` table) are counted with jax.eval_shape: nothing is allocated.
Used by configs/rq2_baselines.py to compare architectures at equal size (the paper's RQ2, arXiv 2403.03206 §5.2.3).
"""

from collections.abc import Mapping
import math
from typing import Any

import flax.linen as nn

from rflow_jax.model import baselines
from rflow_jax.model import mmdit
from rflow_jax.model import registry
from rflow_jax.model import variants


def trainable_param_count(model: nn.Module) -> int:
  """Parameters of a backbone without the fixed `pos_embed` table.

  Independent of the image size (the table's size is pos_embed_max_size), so
  the smallest input is traced; jax.eval_shape allocates nothing.
  """
  p = model.patch_size
  return variants.count_params(
      model, (1, p, p, model.in_channels), (1, 1, model.context_dim), (1, model.pooled_dim), include_pos_embed=False
  )


def param_matched_width(
    arch: str,
    depth: int,
    target_params: int,
    *,
    head_dim: int | None = None,
    num_heads: int | None = None,
    tol: float = 0.05,
    **kwargs: Any,
) -> dict[str, int]:
  """The width at which `arch` of a given depth has ~target_params params.

  Trainable params (without pos_embed) are an exact quadratic in the width
  for a fixed depth and head rule, so three abstract counts determine it;
  the nearest admissible widths are then counted exactly.

  Args:
    arch: a key of ARCHITECTURES.
    depth: number of blocks (kept fixed).
    target_params: the count to match, e.g. trainable_param_count(mmdit).
    head_dim: keep head_dim fixed (num_heads = width / head_dim), as the SD3
      family does (64). Exactly one of head_dim / num_heads.
    num_heads: keep the number of heads fixed instead (head_dim varies);
      finer width steps, for small models.
    tol: accepted relative difference |count / target - 1|.
    **kwargs: the other constructor arguments (patch_size, in_channels,
      context_dim, pooled_dim, qk_norm, mlp_ratio, ...).

  Returns:
    {"depth": depth, "hidden_size": width, "num_heads": heads}.

  Raises:
    ValueError: bad arguments, or no admissible width within tol (the
      message names the closest width and its count).
  """
  if (head_dim is None) == (num_heads is None):
    raise ValueError(f"give exactly one of head_dim={head_dim} and " f"num_heads={num_heads}")
  if target_params <= 0:
    raise ValueError(f"target_params={target_params} must be positive")
  fixed = head_dim if head_dim is not None else num_heads
  if fixed <= 0:
    raise ValueError(f"head_dim/num_heads={fixed} must be positive")
  # Widths must be multiples of the head rule and of 4 (sin-cos table).
  step = math.lcm(fixed, 4)

  def kwargs_at(k: int) -> dict[str, int]:
    width = k * step
    heads = width // head_dim if head_dim is not None else num_heads
    return dict(depth=depth, hidden_size=width, num_heads=heads)

  def count(k: int) -> int:
    return trainable_param_count(registry.build(arch, **kwargs, **kwargs_at(k)))

  p1, p2, p3 = count(1), count(2), count(3)
  a = (p1 - 2 * p2 + p3) / 2
  b = p2 - p1 - 3 * a
  c = p1 - a - b
  if a > 0:
    k = (-b + math.sqrt(max(b * b - 4 * a * (c - target_params), 0.0))) / (2 * a)
  else:
    k = (target_params - c) / b
  candidates = sorted({max(1, math.floor(k)), max(1, math.ceil(k))})
  best = min(((abs(count(j) / target_params - 1), j) for j in candidates))
  if best[0] > tol:
    got = count(best[1])
    raise ValueError(
        f"{arch} at depth={depth}: closest width {best[1] * step} has {got} "
        f"params, {best[0]:.1%} from target_params={target_params} "
        f"(tol {tol:.0%}); use num_heads= for finer width steps or change "
        f"the depth"
    )
  return kwargs_at(best[1])


def param_table(
    reference: Mapping[str, Any], *, head_dim: int | None = None, num_heads: int | None = None, tol: float = 0.05
) -> dict[str, dict[str, int]]:
  """Parameter-matched variants of every architecture at MMDiT's depth.

  Args:
    reference: MMDiT constructor kwargs (the model to match).
    head_dim: see param_matched_width.
    num_heads: see param_matched_width.
    tol: see param_matched_width.

  Returns:
    arch -> {"depth", "hidden_size", "num_heads"}; "mmdit" is the reference.
  """
  ref = dict(reference)
  target = trainable_param_count(mmdit.MMDiT(**ref))
  shape = {k: ref.pop(k) for k in ("depth", "hidden_size", "num_heads")}
  # MMDiT-only attributes (dual attention, scan): the baselines have none.
  ref = {
      k: v for k, v in ref.items() if k in baselines.COMMON_FIELDS and k not in ("dual_attention_layers", "scan_blocks")
  }
  table = {"mmdit": shape}
  for arch in registry.ARCHITECTURES:
    if arch != "mmdit":
      table[arch] = param_matched_width(
          arch, shape["depth"], target, head_dim=head_dim, num_heads=num_heads, tol=tol, **ref
      )
  return table
