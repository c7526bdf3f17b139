"""The fine-tuning methods, each wrapping a frozen layer: LoRA (lora.py), DoRA (dora.py), their dropout
samplers (dropout.py), and inject.py, which puts them into a backbone and merges them back."""
