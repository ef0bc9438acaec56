"""unCLIP (DALL-E 2, Ramesh et al. 2022): a diffusion prior from CLIP text embeddings to CLIP image
embeddings, and a diffusion decoder (+ optional upsampler) from image embeddings to pixels."""

from dalle_ar.unclip.decoder import UnetDecoder, build_decoder
from dalle_ar.unclip.diffusion import GaussianDiffusion, conditional, guided
from dalle_ar.unclip.prior import DiffusionPrior, build_prior

__all__ = ["GaussianDiffusion", "guided", "conditional", "DiffusionPrior", "build_prior", "UnetDecoder", "build_decoder"]
