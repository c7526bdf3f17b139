"""Reports: metrics from a confusion matrix (metrics.py) and PNG plots with Pillow alone (plots.py)."""
