"""Benchmarks for vlm: `python -m bench [--quick] [--device cpu|cuda] [--only NAME,...]
[--out FILE]`.

One module per benchmark, each with a `run(ctx) -> {"metrics": [...], "details": {...}}`:

- caption   Pipeline.caption vs ClipCap's own inference (clipcap_reference.py)
- stream    Pipeline.stream_caption vs Pipeline.caption: time to first text, to full caption
- zeroshot  Pipeline.classify against 1,000 labels vs the bare image encoder
- index     Pipeline.build_index over JPEG files vs the bare encoder on ready tensors
- search    FAISS exact vs approximate query latency and recall, via SearchIndex
- memory    peak RSS of load + caption in a fresh process vs `import torch`

Every figure is a ratio against a reference measured in the same run on the same inputs,
with the absolute numbers beside it. The models are full-size architectures with random
weights (open_clip ViT-B-32, GPT-2 124M), built offline; see common.py.
"""

import os

# everything here is built locally: never wait on the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
