"""inference stage of the study."""
