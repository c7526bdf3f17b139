"""Images in: folders and manifests (folders.py), augmentations (augment.py), class balance (balance.py)."""
