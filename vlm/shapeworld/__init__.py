"""ShapeWorld, the bundled model's world, in one place: the world itself (`world`: scenes,
rendering, captions, questions, the HELD_OUT combinations; its names are this package's, so
`from vlm import shapeworld as sw; sw.sample_scene(...)`), its training recipe (`recipe`:
`ShapeWorld`, a `vlm.training.data.TrainingData`), its evaluation (`evaluation`:
`vlm eval shapeworld`, the targets) the demo's example scenes (`examples`: each tab's
examples with the outputs they should give) and clips of scenes that move (`clips`)."""

from .world import *  # noqa: F403
from .world import __all__  # noqa: F401
