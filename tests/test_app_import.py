"""Importing app.py builds no page and loads no model (tests and tools import it cheaply);
`app.demo`, what `gradio app.py` and Spaces serve, is built when first asked for, with every
endpoint the API has always had."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import json, vlm.pipeline
built = []
init = vlm.pipeline.Pipeline.__init__
vlm.pipeline.Pipeline.__init__ = lambda self, *a, **k: built.append(1) or init(self, *a, **k)
import app
on_import = (len(built), "demo" in vars(app))
names = sorted(d.api_name for d in app.demo.fns.values() if d.api_visibility == "public")
print(json.dumps({"on_import": on_import, "after": len(built), "api": names}))
"""

API = ["answer", "answer_video", "answer_words", "caption", "caption_files", "caption_words",
       "chat", "classify", "describe_video", "explain", "familiarity", "few_shot",
       "few_shot_words", "index_add", "live_caption", "search"]  # fmt: skip


def test_importing_app_loads_no_model_and_demo_is_built_on_use(tmp_path):
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
           "VLM_DEVICE": "cpu", "GRADIO_ANALYTICS_ENABLED": "False"}  # fmt: skip
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, text=True,
                            capture_output=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["on_import"] == [0, False]  # no pipeline, no page
    assert report["after"] == 1 and report["api"] == API  # the bundled model, every endpoint
