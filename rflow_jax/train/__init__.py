"""Training: state, optimiser, the pure train step, checkpointing and the CLU loop."""
