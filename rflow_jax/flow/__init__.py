"""Training-side flow matching: forward paths and time convention (paths), timestep samplers and the
resolution shift (timesteps), the SD3 paper's formulations (formulations) and per-example losses (losses)."""
