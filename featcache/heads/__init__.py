"""Heads trained on cached features, and the registry of head kinds.

:mod:`featcache.heads.base` holds the :class:`Head` contract, the shared
pieces (:class:`FeatureNorm`, :class:`LinearHead`, class weights) and
:data:`HEADS`, the kinds by ``--heads`` name. The kinds offered:

- ``logistic`` (:mod:`featcache.heads.logistic`): scikit-learn's L2 logistic
  regression on standardized features, C from a grid;
- ``sweep`` (:mod:`featcache.heads.sweep`): dozens of linear heads trained at
  once in torch over learning rate x weight decay x class weight x
  normalization, with torch threads chosen for the fit and the free cores;
- ``knn`` (:mod:`featcache.heads.knn`): cosine k-nearest-neighbour votes,
  k x temperature x class weight from one exact search, the train rows kept
  by reference to their cache;
- ``mlp`` (:mod:`featcache.heads.mlp`): one-hidden-layer probes with dropout,
  width x weight decay x lr trained at once, each stopped early on validation.

Every kind exports its chosen head as what ``head.pt`` stores, its kind
recorded. Importing this package imports every kind, so :data:`HEADS` is
full; a new kind is a module here that registers its class, imported below.
"""

from featcache.heads.base import HEADS, FeatureNorm, Head, HeadSettings, LinearHead, load_head, resolve_head_options
from featcache.heads.logistic import LogisticHead
from featcache.heads.sweep import LinearHeadSweep, SweepHead
from featcache.heads.knn import KnnHead
from featcache.heads.mlp import MlpHead, MlpSweep

__all__ = ["HEADS", "FeatureNorm", "Head", "HeadSettings", "KnnHead", "LinearHead", "LinearHeadSweep",
           "LogisticHead", "MlpHead", "MlpSweep", "SweepHead", "load_head", "resolve_head_options"]
