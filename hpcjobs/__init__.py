"""hpcjobs: Slurm-native orchestration of LLM training pipelines."""

__version__ = "0.1.0"
