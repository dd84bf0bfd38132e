"""IR -> Triton source."""
