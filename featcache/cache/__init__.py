"""featcache.cache.h5."""
