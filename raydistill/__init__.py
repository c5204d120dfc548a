"""raydistill: distill diffusion teachers into few-step students on Ray clusters."""

__version__ = "0.1.0"
