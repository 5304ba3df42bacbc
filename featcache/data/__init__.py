"""Images and their labels: what a data folder holds, before any decoding.

- :mod:`~featcache.data.manifest`: :func:`scan` walks a folder once into a
  :class:`Manifest` (paths, classes, splits, patients, skipped files, the
  carved validation split), refusing hostile entries;
- :mod:`~featcache.data.synth`: full-size synthetic X-rays for benchmarks;
- :mod:`~featcache.data.demo`: the embedded 400-image Kermany subset and
  ``featcache demo``.
"""
