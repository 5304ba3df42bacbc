"""The feature cache: one HDF5 file per backbone and dataset, and how it is written safely.

- :mod:`~featcache.cache.h5`: :class:`FeatureCache`, the schema, its
  checks (schema, SHA-256 of the features) and the reader;
- :mod:`~featcache.cache.parts`: committed chunks, so a crash loses at most
  one chunk and a rerun resumes;
- :mod:`~featcache.cache.lock`: one writer per cache (:class:`CacheLock`,
  a context manager);
- :mod:`~featcache.cache.dataset`: a cache split as a torch ``Dataset``;
- :mod:`~featcache.cache.describe`: ``featcache inspect``.
"""
