"""The objects the node makes (SEG, SC, derived images), their checks and the store that indexes them."""
