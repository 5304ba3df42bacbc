"""featcache.data."""
