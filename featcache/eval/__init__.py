"""Evaluation: metrics with patient-level confidence intervals, and run folders.

- :mod:`~featcache.eval.metrics`: AUROC, clinical metrics at a threshold,
  thresholds chosen on validation, patient-bootstrap CIs;
- :mod:`~featcache.eval.rundir`: :class:`RunRecord`, the one module that
  knows a run folder's files (:func:`load_run`);
- :mod:`~featcache.eval.parity`: criteria that tell a correct decode (or
  precision) from a wrong one.
"""
