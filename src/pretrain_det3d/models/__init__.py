"""models stage of the study."""
