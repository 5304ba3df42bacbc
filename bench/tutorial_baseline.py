"""The baselines featcache is measured against: the PyTorch tutorial's fixed feature extractor and the
naive extraction loop, as people run them (featcache/baselines.py says exactly what each does).

    python bench/tutorial_baseline.py tutorial DATA [--epochs 25] [--max-images N [--subsample-all]]
    python bench/tutorial_baseline.py naive DATA [--max-images N [--subsample-all]]
"""

import sys

from featcache.baselines import main

if __name__ == "__main__":
    sys.exit(main())
