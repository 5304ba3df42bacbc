"""featcache.runtime."""
