"""Building blocks shared by every family: one concept per file."""
