"""diffusers model families (one file each); added by the diffusion work."""
