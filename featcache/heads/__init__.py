"""featcache.heads.sweep."""
