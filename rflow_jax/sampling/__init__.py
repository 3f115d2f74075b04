"""Inference: σ schedules (schedules), jitted ODE solvers on the rf path (solvers) and classifier-free
guidance (guidance). The prompt-to-image pipeline lives in sampling/pipeline.py."""
