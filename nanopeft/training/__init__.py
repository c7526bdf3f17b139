"""What train.py stands on: flags (flags.py), the model a run builds (build.py), its memory model (memory.py)
and counts (counts.py), the micro-batch order across processes (distributed.py), the run folder (run.py),
validation history (history.py), the frozen-feature cache (features.py) and the demo (demo.py)."""
