"""Stage prepare: the built-in case generator, the importers for your data, and the group-aware splits."""
