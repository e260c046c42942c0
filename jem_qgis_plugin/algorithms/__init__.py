"""Processing algorithms of the `jem` provider: thin adapters over jem_core."""
