"""Analytic ViT FLOPs agree with the published GMACs (REFERENCE.md section 4)."""
import pytest

from vit_jax import flops
from vit_jax.models import swin, vit


@pytest.mark.parametrize('shape, published_gmacs', [
    ((16, 384, 12, 1536), 4.61), ((16, 768, 12, 3072), 17.58), ((16, 1024, 24, 4096), 61.6),
    ((14, 1280, 32, 5120), 167.4)])
def test_vit_macs_match_published(shape, published_gmacs):
  patch, width, depth, mlp = shape
  macs = vit.vit_forward_macs(image_size=224, patch_size=patch, hidden_size=width, num_layers=depth, mlp_dim=mlp)
  assert macs / 1e9 == pytest.approx(published_gmacs, rel=5e-3)
  assert flops.train_flops(macs) == 6 * macs


def test_indivisible_image_size_is_refused():
  with pytest.raises(ValueError, match='not divisible'):
    vit.vit_forward_macs(image_size=225, patch_size=16, hidden_size=8, num_layers=1, mlp_dim=8)


@pytest.mark.parametrize('kwargs, published_gmacs', [
    (dict(embed_dim=96, depths=(2, 2, 6, 2)), 4.5), (dict(embed_dim=128, depths=(2, 2, 18, 2)), 15.4)])
def test_swin_macs_match_published(kwargs, published_gmacs):
  assert swin.swin_forward_macs(image_size=224, **kwargs) / 1e9 == pytest.approx(published_gmacs, rel=5e-3)


def test_model_flops_analytic_where_known_and_xla_cost_analysis_agrees():
  """Registry models: analytic for ViT/DeiT/Swin v1; XLA also counts elementwise work (erf GELU, softmax), a few % more."""
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  for name, published_gmacs, slack in (('vit_s16', 4.61, 0.02), ('deit_s16_distilled', 4.63, 0.04),
                                       ('swin_t', 4.5, 0.06)):
    model = models.create_model(name, num_classes=1000)
    fwd, method = flops.model_forward_flops(model, 224)
    assert method == 'analytic'
    assert fwd / 2e9 == pytest.approx(published_gmacs, rel=1e-2)
    xla = flops.xla_forward_flops(model, 224)
    assert fwd <= xla <= fwd * (1 + slack), (name, fwd, xla)
  fwd, method = flops.model_forward_flops(models.create_model('mixer_b16', num_classes=1000), 224)
  assert method == 'xla' and fwd / 2e9 == pytest.approx(12.61, rel=1e-2)  # Published Mixer-B/16: 12.61 GMACs.
