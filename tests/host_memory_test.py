"""RFLOW_JAX_MALLOC (host_memory.configure, applied by cli.parse_flags): under reuse, the default where JAX can only
use the CPU, an executable's temporary buffer stops being page-faulted in on every call; system keeps glibc's
behaviour."""

import json
import os
import platform
import subprocess
import sys

import cli_util  # tests/cli_util.py (pytest puts tests/ on sys.path)
import pytest

from rflow_jax import cli
from rflow_jax.utils import host_memory

# Two dots with a 128 MiB (8192 x 4096 float32) temporary between them: XLA:CPU allocates it for every call.
PROBE = """
import json, resource
import jax, jax.numpy as jnp
from rflow_jax import cli
from rflow_jax.utils import host_memory
cli.parse_flags(["probe"])  # As every entry point: applies $RFLOW_JAX_MALLOC.
mode = host_memory.configure()
f = jax.jit(lambda x, w: (jnp.tanh(x @ w) @ w.T).sum())
x, w = jnp.ones((8192, 64), jnp.float32), jnp.ones((64, 4096), jnp.float32) / 64
for _ in range(2):
  f(x, w).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
  f(x, w).block_until_ready()
print(json.dumps({"mode": mode, "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4}))
"""
TEMP_PAGES = 8192 * 4096 * 4 // 4096


def _pages_per_fault() -> int:
  """4 KiB pages one fault maps: 512 where transparent huge pages are always on (2 MiB per fault), else 1."""
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return 512 if "[always]" in f.read() else 1
  except OSError:
    return 1


def _run(code: str, **env: str) -> dict:
  proc = subprocess.run(
      [sys.executable, "-c", code],
      capture_output=True,
      text=True,
      cwd=cli_util.ROOT,
      env={**{k: v for k, v in cli_util.ENV.items() if k != host_memory.ENV}, "JAX_PLATFORMS": "cpu", **env},
      check=True,
      timeout=120,
  )
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_reuse_stops_the_per_call_page_faults():
  system, reuse = _run(PROBE, RFLOW_JAX_MALLOC="system"), _run(PROBE)  # JAX_PLATFORMS=cpu: the default is reuse.
  assert system["mode"] == "system" and reuse["mode"] == "reuse"
  # glibc's defaults map the temporary afresh each call (one fault per page); reuse hands the same pages back.
  faults = TEMP_PAGES / _pages_per_fault()  # Mapping the temporary afresh costs this many faults.
  assert system["faults"] >= 0.5 * faults, system
  assert reuse["faults"] <= 0.02 * faults, reuse


# 256 MiB freed by numpy, then host_memory.release_free(): resident memory (from /proc/self/statm) at each point.
RELEASE = """
import json, os, numpy as np
from rflow_jax import cli
from rflow_jax.utils import host_memory
cli.parse_flags(["probe"])
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
a = np.ones(2**25)
allocated = rss()
del a
freed = rss()
released = host_memory.release_free()
print(json.dumps({"allocated": allocated, "freed": freed, "after": rss(), "released": released}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_release_free_returns_what_reuse_keeps():
  mib = 2**20
  system, reuse = _run(RELEASE, RFLOW_JAX_MALLOC="system"), _run(RELEASE, RFLOW_JAX_MALLOC="reuse")
  # glibc's defaults unmap the 256 MiB block at `del`; there is nothing for release_free to do.
  assert system["allocated"] - system["freed"] >= 200 * mib and not system["released"], system
  # reuse keeps the freed block resident (for the next step) until release_free hands it back.
  assert reuse["freed"] >= reuse["allocated"] - 16 * mib and reuse["released"], reuse
  assert reuse["freed"] - reuse["after"] >= 200 * mib, reuse


@pytest.mark.slow
def test_the_trainer_under_reuse_logs_the_same_losses(tmp_path):
  """`RFLOW_JAX_MALLOC=reuse` changes where buffers live and when the loop waits for a step, never a value."""
  losses = {}
  for mode in ("system", "reuse"):
    workdir = tmp_path / mode
    subprocess.run(
        [sys.executable, "-m", "rflow_jax.main", "--config=configs/debug.py", f"--workdir={workdir}"]
        + ["--config.train.log_every=1", "--config.train.preview_at_end=False"],
        cwd=cli_util.ROOT,
        env={**cli_util.ENV, "JAX_PLATFORMS": "cpu", host_memory.ENV: mode},
        check=True,
        capture_output=True,
        timeout=300,
    )
    with open(workdir / "metrics.jsonl") as f:
      rows = [json.loads(line) for line in f]
    losses[mode] = [(r["step"], r["loss"]) for r in rows if "loss" in r]
  assert len(losses["system"]) == 4 and losses["reuse"] == losses["system"]


def test_auto_reuses_only_where_jax_can_only_use_the_cpu(tmp_path, monkeypatch):
  monkeypatch.delenv(host_memory.ENV, raising=False)
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert host_memory.configure() == "system (auto: JAX_PLATFORMS=cuda,cpu)"  # Returns before any mallopt.
  assert not host_memory.reusing()
  # JAX_PLATFORMS unset: an installed GPU plugin (a jax_plugins module, as the CUDA plugin installs) decides.
  (tmp_path / "jax_plugins" / "xla_fakegpu").mkdir(parents=True)
  (tmp_path / "jax_plugins" / "xla_fakegpu" / "__init__.py").write_text("")
  code = "from rflow_jax.utils import host_memory; import json; print(json.dumps({'why': host_memory.accelerator()}))"
  env = {k: v for k, v in cli_util.ENV.items() if k != "JAX_PLATFORMS"}
  env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{cli_util.ROOT}"
  proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=cli_util.ROOT, capture_output=True, text=True)
  assert json.loads(proc.stdout)["why"] == "JAX plugin xla_fakegpu is installed", proc.stderr[-1000:]
  env["PYTHONPATH"] = cli_util.ROOT  # This machine: no plugin, no libtpu (CI's CPU wheel of jaxlib).
  proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=cli_util.ROOT, capture_output=True, text=True)
  assert json.loads(proc.stdout)["why"] is None, proc.stderr[-1000:]


def test_a_bad_mode_is_one_error_line(monkeypatch, capsys):
  with pytest.raises(ValueError, match=r"^RFLOW_JAX_MALLOC='arena': expected one of auto, system, reuse$"):
    host_memory.configure("arena")
  monkeypatch.setenv(host_memory.ENV, "arena")
  with pytest.raises(SystemExit) as exit_info:
    cli.parse_flags(["prog"])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == "error: RFLOW_JAX_MALLOC='arena': expected one of auto, system, reuse\n"
