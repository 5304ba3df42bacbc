"""featcache: frozen-backbone feature caches, fast linear heads and fine-tuning
for chest X-ray transfer learning.

The package imports nothing heavy at import time, so ``featcache --help`` is
instant; torch, torchvision, h5py and DALI are imported where they are used.
"""

__version__ = "0.1.0"
