"""Flow matching: timesteps, noising and the loss, latent packing and positions, the sampler."""

from qflux.diffusion.flow import add_noise, flow_match_loss
from qflux.diffusion.latents import pack_latents, unpack_latents

__all__ = ["add_noise", "flow_match_loss", "pack_latents", "unpack_latents"]
