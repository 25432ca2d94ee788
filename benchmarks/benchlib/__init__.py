"""The code of benchmarks/bench_step.py (the command line), one module per job:

  config     the optimizers compared, their hyperparameters, the clipping settings
  timer      the interleaved round-robin timer and the per-function step timers
  iteration  section 1: whole training iterations
  step       sections 2 and 3: one optimizer step alone, and clip + step
  low_bytes  section 4: one step per storage variant (issue 17's low-byte options)
  report     machine description, markdown tables, JSON payload
  charts     PNG charts (matplotlib)

bench_step.py puts benchmarks/ on the import path by being run from it as a script.
"""
