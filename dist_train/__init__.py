"""dist_train: a readable DDP training framework for torchrun, SLURM and a laptop CPU."""

__version__ = "0.1.0"
