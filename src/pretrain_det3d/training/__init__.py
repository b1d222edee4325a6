"""training stage of the study."""
