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
  pos         rows of the positional table (also T5's relative-position buckets)
  vocab       rows of a token-embedding table (text encoders): over tensor in fsdp_tp, else the table splits along
              "embed" only
  vae_channels  hidden widths a VAE convolution, norm or mid-block attention projection writes
  vae_in      hidden widths a VAE convolution or projection reads (the kernel's other axis: Flax allows one
              logical name once per array; replicated, since the output width already carries the sharding)
  conv_in     image or latent channels a VAE convolution reads (3 or 4..16: never sharded)
  conv_out    image or latent channels a VAE convolution writes (never sharded)

`config.sharding.rule_overrides` replaces the preset's entry for a logical name, e.g.
`(("mlp", "fsdp"),)` shards MLP hidden widths over fsdp; `validate_rules` rejects unknown logical names, unknown
mesh axes and a mesh axis used twice in one rule before anything is compiled.
"""

MESH_AXES = ("data", "fsdp", "tensor")
LOGICAL_AXES = (
    "batch",
    "length",
    "embed",
    "mlp",
    "heads",
    "kv",
    "modulation",
    "patch",
    "cond",
    "pos",
    "vocab",
    "vae_channels",
    "vae_in",
    "conv_in",
    "conv_out",
)

_COMMON = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("kv", None),
    ("patch", None),
    ("cond", None),
    ("pos", None),
    ("vae_in", None),
    ("conv_in", None),
    ("conv_out", None),
)

PRESETS = {
    # Pure data parallelism: every parameter replicated.
    "dp": _COMMON
    + (("embed", None), ("mlp", None), ("heads", None), ("modulation", None), ("vocab", None), ("vae_channels", None)),
    # ZeRO-3 style: parameters (and with them optimizer and EMA state) sharded over fsdp along the width. Flax
    # takes the first rule whose mesh axis is still free, so a kernel with an "embed" axis is split along it, and
    # arrays without one (biases, the t/y embedders' first layer) along their own width instead of replicated.
    "fsdp": _COMMON
    + (
        ("embed", "fsdp"),
        ("mlp", "fsdp"),
        ("heads", "fsdp"),
        ("modulation", "fsdp"),
        ("vocab", None),
        ("vae_channels", "fsdp"),
    ),
    # fsdp plus Megatron-style tensor parallelism of the MLP hidden and attention heads, and of token-embedding rows
    # (T5-XXL's 32128×4096 table split over fsdp alone would hold 8% of the encoder per device on fsdp 2 × tensor 4).
    "fsdp_tp": _COMMON
    + (
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("modulation", "tensor"),
        ("vocab", "tensor"),
        ("vae_channels", "fsdp"),
    ),
}


def get_rules(name: str, overrides=()):
  """The logical-axis rules of a preset with `overrides` applied, as Flax expects them.

  Args:
    name: a key of PRESETS.
    overrides: (logical, mesh axis | tuple of mesh axes | None) pairs replacing the preset's entry for that
      logical name (or appended, if the preset has none).

  Returns:
    A tuple of (logical, mesh) pairs, validated.
  """
  if name not in PRESETS:
    raise ValueError(f"sharding.rules={name!r} is not a preset; valid: {sorted(PRESETS)}")
  table = dict(PRESETS[name])
  for pair in overrides:
    if len(pair) != 2:
      raise ValueError(f"sharding.rule_overrides entry {pair!r} must be a (logical, mesh axes) pair")
    logical, axes = pair
    table[logical] = tuple(axes) if isinstance(axes, list) else axes
  result = tuple(table.items())
  validate_rules(result)
  return result


def validate_rules(logical_rules) -> None:
  """Raises ValueError naming the first rule with an unknown logical name, an unknown mesh axis or a repeat."""
  for logical, axes in logical_rules:
    if logical not in LOGICAL_AXES:
      raise ValueError(f"sharding rule ({logical!r}, {axes!r}) names an unknown logical axis; valid: {LOGICAL_AXES}")
    named = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    unknown = [a for a in named if a not in MESH_AXES]
    if unknown:
      raise ValueError(
          f"sharding rule ({logical!r}, {axes!r}) names mesh axis {unknown[0]!r}, which is not one of " f"{MESH_AXES}"
      )
    if len(set(named)) != len(named):
      raise ValueError(f"sharding rule ({logical!r}, {axes!r}) uses a mesh axis twice")


def rules_from_config(sharding_config):
  """`get_rules` of `config.sharding` (rules preset + rule_overrides)."""
  return get_rules(sharding_config.rules, sharding_config.rule_overrides)
