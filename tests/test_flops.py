"""Analytic ViT FLOPs agree with the published GMACs (REFERENCE.md section 4)."""
import pytest

from vit_jax import flops


@pytest.mark.parametrize('shape, published_gmacs', [
    ((16, 384, 12, 1536), 4.61), ((16, 768, 12, 3072), 17.58), ((16, 1024, 24, 4096), 61.6),
    ((14, 1280, 32, 5120), 167.4)])
def test_vit_macs_match_published(shape, published_gmacs):
  patch, width, depth, mlp = shape
  macs = flops.vit_forward_macs(image_size=224, patch_size=patch, hidden_size=width, num_layers=depth, mlp_dim=mlp)
  assert macs / 1e9 == pytest.approx(published_gmacs, rel=5e-3)
  assert flops.train_flops(macs) == 6 * macs


def test_indivisible_image_size_is_refused():
  with pytest.raises(ValueError, match='not divisible'):
    flops.vit_forward_macs(image_size=225, patch_size=16, hidden_size=8, num_layers=1, mlp_dim=8)
