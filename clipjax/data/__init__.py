"""Image loading and CLIP preprocessing."""
