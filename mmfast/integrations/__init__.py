"""Per-instance, reversible replacement of hot modules in Hugging Face transformers and
diffusers models: one small file per model family with a table of replacements."""
