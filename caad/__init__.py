"""caad: the CAAD training framework."""
