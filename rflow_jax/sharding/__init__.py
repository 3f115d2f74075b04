"""Meshes, logical-axis rules and partitioning helpers (rflow_jax's only home of mesh axis names)."""
