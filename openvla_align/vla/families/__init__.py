"""Model families: what differs between VLAs that share OpenVLA's layout (vision backbone -> projector -> LLM, visual
tokens right after BOS), known once, here.

A family says whether a model is one of its own, where its (innermost) vision backbone is, how many images each
sample feeds it, and which of its vision parameters are conditioning layers added on top of the pretrained towers.
The visual-token count itself is always read from the vision projector's output (hooks.py): that holds for every
family, and never counts the proprio or diffusion-timestep tokens OFT appends after the visual ones.

    family_of(vla).num_images(unwrap(vla))

Families are tried most specific first; registering one is one module and one ``register_family`` call.
"""

from .base import ModelFamily, families, family_of, register_family
from .openvla_oft import OpenVLAOFT

__all__ = ["ModelFamily", "OpenVLAOFT", "family_of", "families", "register_family"]
