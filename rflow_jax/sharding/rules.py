"""Logical axis vocabulary and the rule presets that map it onto the mesh axes (data, fsdp, tensor).

Parameters and activations are annotated with *logical* names where they are created (models/); which mesh axis
each name is sharded over is decided here, once, by a preset selected with `config.sharding.rules`.

Vocabulary:
  batch       examples of a batch (activations)
  length      tokens of a sequence (activations)
  embed       the model width H
  mlp         the MLP hidden width
  heads       the flattened num_heads·head_dim width of q/k/v projections
  kv          one head's width (e.g. the QK-RMSNorm scale)
  modulation  adaLN outputs (n·H)
  patch       p·p·C features of the patch embed input / final projection output
  cond        input widths of context / pooled / time-frequency features
  pos         rows of the positional table
"""

MESH_AXES = ("data", "fsdp", "tensor")

_COMMON = (("batch", ("data", "fsdp")), ("length", None), ("kv", None), ("patch", None), ("cond", None),
           ("pos", None))

PRESETS = {
    # Pure data parallelism: every parameter replicated.
    "dp": _COMMON + (("embed", None), ("mlp", None), ("heads", None), ("modulation", None)),
    # ZeRO-3 style: parameters (and with them optimizer and EMA state) sharded over fsdp along the width.
    "fsdp": _COMMON + (("embed", "fsdp"), ("mlp", None), ("heads", None), ("modulation", None)),
    # fsdp plus Megatron-style tensor parallelism of the MLP hidden and attention heads.
    "fsdp_tp": _COMMON + (("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("modulation", "tensor")),
}


def get_rules(name: str):
  """Returns the logical-axis rules of a preset, as Flax expects them (a tuple of (logical, mesh) pairs)."""
  if name not in PRESETS:
    raise ValueError(f"sharding.rules={name!r} is not a preset; valid: {sorted(PRESETS)}")
  return PRESETS[name]
