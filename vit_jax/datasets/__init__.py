"""TFDS builders that ship with vit_jax; importing this package registers them with TFDS."""
from vit_jax.datasets.cluttered_digits import ClutteredDigits
from vit_jax.datasets.digits import Digits
from vit_jax.datasets.moving_digits import MovingDigits
from vit_jax.datasets.synthetic_sounds import SyntheticSounds

__all__ = ['ClutteredDigits', 'Digits', 'MovingDigits', 'SyntheticSounds']
