"""``featcache report``: the comparison of runs (Task D) and the analysis of weak results (Task E).

- :mod:`~featcache.report.document`: :func:`build_report`, Markdown, HTML and
  ``report.json`` (every choice and the validation figure it was made by);
- :mod:`~featcache.report.analysis`: overfitting, class balance,
  thresholds, paired comparisons, worst errors;
- :mod:`~featcache.report.plots`: ROC, PR, reliability, confusion matrix,
  learning curves (also written into each run folder);
- :mod:`~featcache.report.pdf`: ``--pdf``.
"""
