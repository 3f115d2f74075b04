"""The native CPU library for the tests that need it (import the fixture: `from native_util import library`)."""

import os

import pytest

from rflow_jax.model import native_attention


@pytest.fixture(scope="module")
def library(tmp_path_factory):
  """The library `make install` built, or else one built now: no g++ fails the parity tests here, loudly."""
  path = native_attention.LIBRARY_PATH
  stale = os.path.exists(path) and os.path.getmtime(path) < max(map(os.path.getmtime, native_attention.SOURCES))
  if not os.path.exists(path) or stale:
    path = native_attention.build(str(tmp_path_factory.mktemp("native") / "native_cpu.so"))
  assert native_attention.load(path) is None
  default, native_attention.LIBRARY_PATH = native_attention.LIBRARY_PATH, path
  yield path
  native_attention.LIBRARY_PATH = default
