"""Images and their labels: what a data set holds, before any decoding.

- :mod:`~featcache.data.sources`: the label sources (``--format folder | csv |
  nih | chexpert | mimic``), one module each, and :func:`read_manifest`;
- :mod:`~featcache.data.manifest`: the :class:`Manifest` every source returns
  (paths, labels as read, splits, patients, skipped files) and :func:`scan`,
  the folder walk, refusing hostile entries;
- :mod:`~featcache.data.labels`: label values (1 / 0 / -1 uncertain / -2 not
  mentioned) and the task names;
- :mod:`~featcache.data.splits`: the validation split carved from train by
  patient (per class, or over every label by iterative stratification);
- :mod:`~featcache.data.synth`: full-size synthetic X-rays for benchmarks;
- :mod:`~featcache.data.demo`: the embedded 400-image Kermany subset and
  ``featcache demo``.
"""
