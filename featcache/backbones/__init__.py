"""featcache.backbones.registry."""
