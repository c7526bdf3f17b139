"""The backbones: DINOv3 (dinov3.py) and the from-scratch baselines (baselines.py); DINOv2 joins here."""
