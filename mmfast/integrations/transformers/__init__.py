"""transformers model families (one file each); added by the vision and connector work."""
