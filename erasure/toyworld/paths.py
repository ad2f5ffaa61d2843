"""Where the committed toy-world weights live."""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
PIPELINE_DIR = WEIGHTS_DIR / "pipeline"
JUDGE_PATH = WEIGHTS_DIR / "judge" / "judge.safetensors"
CLIP_PATH = WEIGHTS_DIR / "clip" / "clip.safetensors"
