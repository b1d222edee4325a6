"""analysis stage of the study."""
