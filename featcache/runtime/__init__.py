"""What every command needs to run well: devices, precision, processes, settings, output.

- :mod:`~featcache.runtime.device`: ``--device``, usable cores, GPU syncs
  for timing, peak memory;
- :mod:`~featcache.runtime.amp`: one mixed-precision decision;
- :mod:`~featcache.runtime.distributed`: torchrun ranks, the ``--nproc``
  launcher, rank-0 decisions (:meth:`Dist.decide`);
- :mod:`~featcache.runtime.config`: TOML configs;
- :mod:`~featcache.runtime.console`, :mod:`~featcache.runtime.progress`,
  :mod:`~featcache.runtime.tables`: what the user reads;
- :mod:`~featcache.runtime.outputs`: checks on output paths before work starts.
"""
