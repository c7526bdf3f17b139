"""Files in and out: the checkpoint format checks (checkpoint_format.py), reading weight files
(checkpoint.py), loading them into a backbone (load.py), and adapter files in PEFT's format (save.py)."""
