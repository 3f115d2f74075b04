"""Scaling-law analysis of sweeps: power-law fits of validation loss against compute (fit.py) and plots (plots.py)."""
