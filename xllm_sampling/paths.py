"""Where the project's resources live: the flag definitions, the series, verify/, csrc/ and the target."""
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
FLAGS_FILE = PROJECT_ROOT / "flags" / "flags.toml"
SERIES_DIR = PROJECT_ROOT / "patches"
CSRC_DIR = PROJECT_ROOT / "csrc"
TARGET_TEMPLATE = PROJECT_ROOT / "target" / "refengine"


def require(path: Path) -> Path:
    """Return ``path`` if it exists, else raise FileNotFoundError explaining the editable install."""
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: xllm-sampling runs from its source tree; install it with `pip install -e .`"
        )
    return path
