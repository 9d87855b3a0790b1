"""pmnode: decentralized model-parallel training with Protocol Models (subspace-compressed boundaries)."""

__version__ = "0.1.0"
