"""Dataset preparation scripts; training reads their .bin outputs."""
