"""posttrain: the post-training lifecycle of open LLMs, from SFT to RL and test-time search."""

__version__ = "0.1.0"
