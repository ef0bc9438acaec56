"""dalle-ar: DALL-E (Ramesh et al. 2021) reproduced in PyTorch."""

__version__ = "0.1.0"
