"""Several engines (one per GPU) on Ray behind the engine API: placement, the engine actors, the front end."""
