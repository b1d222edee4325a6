"""utils stage of the study."""
