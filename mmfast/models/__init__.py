"""Complete models assembled from mmfast.nn, loading Hugging Face checkpoint directories.

    >>> model = mmfast.models.from_pretrained("path/to/Qwen2.5-VL-7B-Instruct")   # local dir, safetensors
    >>> out = model.generate(input_ids, attention_mask, pixel_values=pixels, image_grid_thw=grid)
"""

from mmfast.models.blip2 import Blip2Config, Blip2ForConditionalGeneration
from mmfast.models.checkpoint import CheckpointError, from_pretrained, load_checkpoint, save_pretrained
from mmfast.models.flux import FluxModel
from mmfast.models.flux2 import Flux2Model
from mmfast.models.kv_cache import KVCache
from mmfast.models.ldm import LatentDiffusionModel
from mmfast.models.llava import LlavaConfig, LlavaForConditionalGeneration
from mmfast.models.qwen2_decoder import Qwen2Decoder
from mmfast.models.qwen25_vl import Qwen25VLConfig, Qwen25VLForConditionalGeneration
from mmfast.models.qwen3_vl import Qwen3VLConfig, Qwen3VLForConditionalGeneration
from mmfast.models.sd3 import StableDiffusion3Model
from mmfast.models.wan import WanVideoModel

__all__ = ["CheckpointError", "from_pretrained", "load_checkpoint", "save_pretrained"]
__all__ += ["KVCache", "Qwen2Decoder", "Qwen25VLConfig", "Qwen25VLForConditionalGeneration"]
__all__ += ["Qwen3VLConfig", "Qwen3VLForConditionalGeneration"]
__all__ += ["LatentDiffusionModel"]
__all__ += ["LlavaConfig", "LlavaForConditionalGeneration"]
__all__ += ["Blip2Config", "Blip2ForConditionalGeneration"]
__all__ += ["StableDiffusion3Model"]
__all__ += ["FluxModel", "Flux2Model"]
__all__ += ["WanVideoModel"]
