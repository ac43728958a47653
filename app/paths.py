"""Where the project lives: its root and the Hydra tree, for code that reads files shipped with it."""

from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_DIR / "conf"
