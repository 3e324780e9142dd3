"""transformers model families (one file each); added by the vision and connector work."""

from mmfast.integrations.transformers.lm_attention import use_mmfast_attention  # noqa: F401
