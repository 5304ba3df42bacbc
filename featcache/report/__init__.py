"""featcache.report.document."""
