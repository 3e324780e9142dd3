"""mmfast: fused Triton and CUDA kernels for the hot paths of multimodal models.

``import mmfast`` registers the op families and their backends; it imports no kernel
(Triton is imported when a Triton backend first runs) and probes no hardware.
"""

from mmfast import nn, ops
from mmfast.dispatch import NoBackendError, set_backend
from mmfast.integrations import patch

__version__ = "0.1.0"
__all__ = ["NoBackendError", "nn", "ops", "patch", "set_backend", "__version__"]
