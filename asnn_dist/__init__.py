"""asnn-dist: distributed training of Adaptive Spiking Neural Networks with hybrid input coding."""

__version__ = "0.1.0"
