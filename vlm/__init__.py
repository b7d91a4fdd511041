"""vlm: teach a frozen language model to see with a learned visual prefix (ClipCap, Frozen)."""

from .images import ImageError, load_image
from .mapper import PrefixMapper
from .pipeline import Pipeline, PipelineConfig
from .presets import PRESETS, available_presets
from .search import Hit, IndexLoadError, SearchIndex

__all__ = [
    "PRESETS",
    "Hit",
    "ImageError",
    "IndexLoadError",
    "Pipeline",
    "PipelineConfig",
    "PrefixMapper",
    "SearchIndex",
    "available_presets",
    "load_image",
]
