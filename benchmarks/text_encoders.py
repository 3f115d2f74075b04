"""Text-encoder facts: T5-XXL bytes per device under fsdp (8 and 64 fake devices), an optional AOT compile of its
encode, and the encode throughput of the tiny "sd3" stack on this machine's CPU.

  XLA_FLAGS is set here (64 fake CPU devices) before jax is imported; the last line printed is one JSON object.
  PYTHONPATH=$PWD python benchmarks/text_encoders.py [--aot] [--batch 16] [--repeats 5]
"""

import argparse
import json
import os
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=64").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import base  # pylint: disable=g-import-not-at-top,wrong-import-position
from rflow_jax.model import text_encoders  # pylint: disable=g-import-not-at-top,wrong-import-position
from rflow_jax.model.text import t5  # pylint: disable=g-import-not-at-top,wrong-import-position
from rflow_jax.sharding import mesh as mesh_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from rflow_jax.sharding import partition  # pylint: disable=g-import-not-at-top,wrong-import-position
from rflow_jax.sharding import rules as rules_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from rflow_jax.train import trainer  # pylint: disable=g-import-not-at-top,wrong-import-position


def t5_xxl_sharded(num_devices: int, rules_name: str = "fsdp", mesh_shape=None, length: int = 77):
  """(module, abstract params with NamedShardings, mesh, rules) of T5-XXL on `num_devices` fake devices."""
  model = t5.T5Encoder(t5.T5_V1_1_XXL, dtype=jnp.bfloat16, scan_layers=True)
  mesh = mesh_lib.make_mesh(mesh_shape or (1, num_devices, 1), devices=jax.devices()[:num_devices])
  rules = rules_lib.get_rules(rules_name)
  ids = jnp.zeros((1, length), jnp.int32)
  with nn.logical_axis_rules(rules):
    abstract, _ = trainer.state_shardings(lambda k: model.init(k, ids)["params"], mesh, rules)
  return model, abstract, mesh, rules


def bytes_facts() -> dict:
  out = {}
  for n in (8, 64):
    _, abstract, _, _ = t5_xxl_sharded(n)
    total, shard = partition.total_bytes(abstract), partition.shard_bytes(abstract)
    out[f"t5_xxl_fsdp{n}"] = {
        "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract)),
        "total_bytes_f32": total,
        "bytes_per_device": shard,
        "ideal": total / n,
        "ratio_to_ideal": shard / (total / n),
    }
  return out


def aot_encode(num_devices: int = 8, batch: int = 8, length: int = 77) -> dict:
  """Lowers and compiles T5-XXL's bf16 encode of (batch, length) ids under fsdp; XLA's memory analysis."""
  model, abstract, mesh, rules = t5_xxl_sharded(num_devices)
  ids = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=partition.batch_sharding(mesh, rules))
  fn = jax.jit(lambda p, i: model.apply({"params": p}, i)["last_hidden_state"])
  t0 = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    compiled = fn.lower(abstract, ids).compile()
  mem = compiled.memory_analysis()
  return {
      "devices": num_devices,
      "batch": batch,
      "length": length,
      "compile_s": round(time.perf_counter() - t0, 1),
      "argument_bytes": getattr(mem, "argument_size_in_bytes", None),
      "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
      "output_bytes": getattr(mem, "output_size_in_bytes", None),
  }


def throughput(batch: int, repeats: int) -> dict:
  """Prompts per second of the tiny sd3 stack (base config sizes, t5_length 256) and of the "tiny" stand-ins."""
  out = {}
  for name in ("sd3", "tiny"):
    c = base.get_config().text
    c.encoders = name
    tokenizer, stack = text_encoders.build(c)
    params = nn.meta.unbox(text_encoders.init_params(stack, c))
    tokens = jnp.asarray(tokenizer.batch(["a red circle to the left of two blue squares"] * batch))
    device = jax.devices()[0]
    tokens, params = jax.device_put((tokens, params), device)
    encode = jax.jit(lambda p, t: text_encoders.drop_and_compose(stack.apply({"params": p}, t), None, 0.0))
    jax.block_until_ready(encode(params, tokens))
    t0 = time.perf_counter()
    for _ in range(repeats):
      jax.block_until_ready(encode(params, tokens))
    seconds = (time.perf_counter() - t0) / repeats
    out[f"encode_{name}"] = {
        "batch": batch,
        "tokens": int(tokens.shape[1]),
        "ms_per_batch": round(1e3 * seconds, 2),
        "prompts_per_s": round(batch / seconds, 1),
    }
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--aot", action="store_true", help="also AOT-compile T5-XXL's encode on 8 fake devices")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  result = {"backend": jax.default_backend(), "cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]}
  result.update(bytes_facts())
  if args.aot:
    result["t5_xxl_aot_fsdp8"] = aot_encode()
  result.update(throughput(args.batch, args.repeats))
  print(json.dumps(result))


if __name__ == "__main__":
  main()
