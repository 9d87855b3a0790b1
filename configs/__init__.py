"""The shipped run configs. Installed as package data (`pmnode.configs`), so `--config tiny` works
from a wheel in any directory; see pmnode.config.run.resolve_config_path."""
