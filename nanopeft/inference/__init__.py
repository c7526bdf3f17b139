"""Inference: reading a run and predicting (predict.py), the exported model folder (export.py), the
resumable CSV (csvout.py) and the CPU weight prepacking (prepack.py)."""
