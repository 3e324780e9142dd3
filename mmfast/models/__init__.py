"""Complete models (VLM, LDM) assembled from mmfast.nn, with checkpoint loading.
Filled by the models work; empty until then."""
from mmfast.models.ldm import LatentDiffusionModel  # noqa: E402,F401
