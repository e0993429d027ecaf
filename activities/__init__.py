"""Everything that touches the world: the profile store, channels, run bookkeeping, routing."""
