"""The DALL-E image tokenizer: a gumbel-softmax discrete VAE, usable on its own."""

from dvae.model import DiscreteVAE, Decoder, Encoder

__all__ = ["DiscreteVAE", "Encoder", "Decoder"]
