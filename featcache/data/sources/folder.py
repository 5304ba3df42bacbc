"""``--format folder``: an ImageFolder tree, the class of an image named by its folder (see :func:`scan`)."""

from __future__ import annotations

from featcache.data.manifest import scan
from featcache.data.sources.base import register

register("folder", options=("val_fraction", "min_val", "split_seed", "patient_regex", "label_from_name"),
         expects="DATA/{train,val,test}/CLASS/* or DATA/CLASS/*")(scan)
