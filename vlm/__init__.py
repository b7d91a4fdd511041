"""vlm: teach a frozen language model to see with a learned visual prefix (ClipCap, Frozen)."""

from .images import ImageError, load_image
from .mapper import PrefixMapper
from .pipeline import Pipeline, PipelineConfig
from .presets import PRESETS, available_presets, choose_default_model, runnable_presets
from .search import Hit, IndexLoadError, SearchIndex
from .tasks import TASKS, UnsupportedTaskError

__all__ = [
    "PRESETS",
    "TASKS",
    "Hit",
    "ImageError",
    "IndexLoadError",
    "Pipeline",
    "PipelineConfig",
    "PrefixMapper",
    "SearchIndex",
    "UnsupportedTaskError",
    "available_presets",
    "choose_default_model",
    "load_image",
    "runnable_presets",
]
