"""data stage of the study."""
