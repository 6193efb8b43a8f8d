"""Where the project's resources live: the flag definitions, the series, verify/, csrc/ and the target.

An installed wheel carries them under ``xllm_sampling/_data/``; a source checkout (or an
editable install) has them at the repository's top level. Both layouts are the same below
their root, so a manifest's paths relative to the series root work in either.
"""
from pathlib import Path

_PACKAGED = Path(__file__).resolve().parent / "_data"
PROJECT_ROOT = _PACKAGED if _PACKAGED.is_dir() else Path(__file__).resolve().parent.parent
FLAGS_FILE = PROJECT_ROOT / "flags" / "flags.toml"
SERIES_DIR = PROJECT_ROOT / "patches"
CSRC_DIR = PROJECT_ROOT / "csrc"
TARGET_TEMPLATE = PROJECT_ROOT / "target" / "refengine"
