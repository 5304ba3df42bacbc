"""featcache.eval."""
