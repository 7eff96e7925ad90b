"""Predicting an experiment's memory and speed on a TPU slice from a CPU host (`python -m tspo_jax.fit_check`).

  tpu.py     the chips (HBM, peak bf16 FLOP/s) and a topology's compile-only devices (libtpu)
  hlo.py     loop-aware matmul FLOPs and collective bytes read from a compiled program's HLO
  budget.py  bytes per chip: what a run holds, each compiled function's buffers, the step's peak, the knobs
"""
