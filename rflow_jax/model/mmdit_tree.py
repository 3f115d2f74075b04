"""Where the MM-DiT's joint blocks sit in its param tree: names, scan groups, stacking and depth growth.

A block group [start, stop) is one param `blocks_3` (unscanned) or `blocks_0_12` (a scanned run, leading layer axis).
The model names its groups with these functions and checkpoints, exporters and warm starts convert between the two
layouts and map the blocks of a shallower run with them, so they depend only on the three attributes that decide the
layout (`Layout`) and not on the Linen modules in model/mmdit.py, which import them.
"""

from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np


class Layout(Protocol):
  """The MMDiT attributes that decide its block layout (an MMDiT is one)."""

  depth: int
  dual_attention_layers: tuple[int, ...]
  scan_blocks: bool


def block_groups(model: Layout) -> list[tuple[int, int]]:
  """[start, stop) runs of blocks that scan together.

  Without scan_blocks every block is its own group. With it, maximal runs of
  blocks of the same kind (dual-attention or not; the context_pre_only last
  block is always alone) form one group.
  """
  if not model.scan_blocks:
    return [(i, i + 1) for i in range(model.depth)]
  kind = lambda i: (i in model.dual_attention_layers, i == model.depth - 1)
  groups, start = [], 0
  for i in range(1, model.depth + 1):
    if i == model.depth or kind(i) != kind(start):
      groups.append((start, i))
      start = i
  return groups


def grown_block_positions(src_depth: int, dst_depth: int) -> list[int]:
  """Where the blocks of a depth-`src_depth` MM-DiT go in a depth-`dst_depth` one grown from it.

  The full joint blocks 0..src_depth-2 are spread evenly over 0..dst_depth-2 (first to first, order kept) and the
  context_pre_only last block goes last, e.g. 4 -> 6: [0, 2, 4, 5]. The positions left over get new blocks; adaLN-zero
  starts their gates at 0, so each is the identity on both streams and the grown model computes exactly the
  source's function until training moves them (train.init_grow_depth).
  """
  if not 1 <= src_depth <= dst_depth:
    raise ValueError(f"cannot grow a depth-{src_depth} MM-DiT into depth {dst_depth}: growth only adds blocks")
  full = np.round(np.linspace(0, dst_depth - 2, src_depth - 1)).astype(int)  # Spacing >= 1: no collisions.
  return [int(i) for i in full] + [dst_depth - 1]


def block_name(start: int, stop: int) -> str:
  """Param name of the group [start, stop): blocks_3, or blocks_0_12 (scan)."""
  if stop == start + 1:
    return f"blocks_{start}"
  return f"blocks_{start}_{stop - 1}"


def parse_block_name(name: str) -> tuple[int, int] | None:
  """Inverse of block_name: "blocks_3" -> (3, 4), "blocks_0_12" -> (0, 13); None for a param that is no block."""
  parts = name.split("_")
  if parts[0] != "blocks" or not 2 <= len(parts) <= 3 or not all(p.isdigit() for p in parts[1:]):
    return None
  return int(parts[1]), int(parts[-1]) + 1


def _stack(leaves):
  if all(isinstance(a, np.ndarray) for a in leaves):
    return np.stack(leaves)
  return jnp.stack(leaves)


def stack_blocks(params: dict[str, Any], model: Layout) -> dict[str, Any]:
  """Unscanned (blocks_i) params -> the layout of `model` (scanned groups).

  Args:
    params: unboxed params of model.clone(scan_blocks=False).
    model: the target model; returned unchanged if it does not scan.

  Returns:
    A new top-level dict; scanned groups have a leading layer axis.
  """
  out = {k: v for k, v in params.items() if not k.startswith("blocks_")}
  for start, stop in block_groups(model):
    blocks = [params[f"blocks_{i}"] for i in range(start, stop)]
    out[block_name(start, stop)] = blocks[0] if len(blocks) == 1 else jax.tree.map(lambda *xs: _stack(xs), *blocks)
  return out


def unstack_blocks(params: dict[str, Any], model: Layout) -> dict[str, Any]:
  """Inverse of `stack_blocks`: params of `model` -> blocks_i layout."""
  out = {k: v for k, v in params.items() if not k.startswith("blocks_")}
  for start, stop in block_groups(model):
    group = params[block_name(start, stop)]
    if stop - start == 1:
      out[f"blocks_{start}"] = group
      continue
    for i in range(start, stop):
      out[f"blocks_{i}"] = jax.tree.map(lambda a, j=i - start: a[j], group)
  return out
