"""Complete models (VLM, LDM) assembled from mmfast.nn, with checkpoint loading.
Filled by the models work; empty until then."""
