"""Regenerates the FastViT and MobileViT timm parity fixtures used by tests/test_fastvit.py and
tests/test_mobilevit.py (needs torch + timm; the tests do not).

    python tests/parity/make_mobilevit_fastvit_fixtures.py [fastvit ...]

Tiny configurations of timm's own model classes (the registered variants are megabytes; these are kilobytes),
every parameter random and every BatchNorm running statistic random (make_fixtures.randomize_running_stats), so
eval-mode BatchNorm and the re-parameterisation are checked with non-trivial statistics:

  fastvit   timm FastVit, 48 px: widths 8/16/32/64, depths 1/1/1/1, MLP ratios 3/3/3/2, RepMixer stages 0-2
            (stage 0 without downsampling), an attention stage 3 (2 heads of 32) after a 7x7 conditional
            positional encoding, final_conv to 128 with squeeze-excitation. Stage maps 12, 6, 3, 2 (odd sizes
            through the strided 7x7 and 3x3 convs). Also saved: timm's `reparameterize_model` of it
            (fastvit_reparam.safetensors), its logits ('logits_reparam') and parameter count, the deploy form
            timm ships.

  mobilevit / mobilevitv2
            timm ByobNet with timm's mobilevit (v1) / mobilevitv2 block configs, 48 px: stem 8, widths
            8/8/16/16/24, inverted-residual depths 1/2/1/1/1, global blocks of depth 1/2/1 in stages 2-4 (v1
            transformer widths 16/24/16, 4 heads; v2 half the stage width), patch 2. Stage maps 24, 24, 12, 6,
            3, 2: stage 3's 3x3 map is resized to 4x4 around its global block (v1, back to 3x3) or at its input
            (v2, kept), as timm does for maps that are not a multiple of the patch.

Files, as make_fixtures.py: {name}.safetensors (timm state dict), {name}.npz (input_nhwc, logits, ...),
{name}.json (timm class and kwargs, our model name and overrides).
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures  # noqa: E402  pylint: disable=g-import-not-at-top

OUT_DIR = make_fixtures.OUT_DIR
NUM_CLASSES = 5

_FASTVIT_TIMM = dict(layers=(1, 1, 1, 1), embed_dims=(8, 16, 32, 64), mlp_ratios=(3, 3, 3, 2),
                     token_mixers=('repmixer', 'repmixer', 'repmixer', 'attention'))
_FASTVIT_OURS = dict(depths=(1, 1, 1, 1), embed_dims=(8, 16, 32, 64), mlp_ratios=(3.0, 3.0, 3.0, 2.0),
                     token_mixers=('repmixer', 'repmixer', 'repmixer', 'attention'),
                     pos_embs=(False, False, False, True), drop_path_rate=0.0)


def _timm_fastvit():
  from functools import partial  # pylint: disable=g-import-not-at-top
  from timm.models import fastvit  # pylint: disable=g-import-not-at-top
  cpe = partial(fastvit.RepConditionalPosEnc, spatial_shape=(7, 7))
  model = fastvit.FastVit(**_FASTVIT_TIMM, pos_embs=(None, None, None, cpe), num_classes=NUM_CLASSES)
  kwargs = dict(_FASTVIT_TIMM, pos_embs='(None, None, None, RepConditionalPosEnc(spatial_shape=(7, 7)))',
                num_classes=NUM_CLASSES)
  return model, 'timm.models.fastvit.FastVit', kwargs


# MobileViT: a ByobNet of timm's own mobilevit block configs, 5 stages of widths 8/8/16/16/24 (stem 8).
_MOBILEVIT_OURS = dict(stem_width=8, widths=(8, 8, 16, 16, 24), ir_depths=(1, 2, 1, 1, 1),
                       transformer_depths=(0, 0, 1, 2, 1), drop_path_rate=0.0)


def _timm_mobilevit(version: int):
  from timm.models import byobnet, mobilevit  # pylint: disable=g-import-not-at-top
  ir = mobilevit._inverted_residual_block  # pylint: disable=protected-access
  if version == 1:
    mvit = lambda c, dim, depth: mobilevit._mobilevit_block(  # pylint: disable=protected-access
        d=1, c=c, s=2, transformer_dim=dim, transformer_depth=depth, patch_size=2, br=2.0)
    blocks = (ir(d=1, c=8, s=1, br=2.0), ir(d=2, c=8, s=2, br=2.0), mvit(16, 16, 1), mvit(16, 24, 2), mvit(24, 16, 1))
    extra = dict(num_features=40)
  else:
    mvit = lambda c, depth: mobilevit._mobilevitv2_block(  # pylint: disable=protected-access
        d=1, c=c, s=2, transformer_depth=depth)
    blocks = (ir(d=1, c=8, s=1, br=2.0), ir(d=2, c=8, s=2, br=2.0), mvit(16, 1), mvit(16, 2), mvit(24, 1))
    extra = {}
  cfg = byobnet.ByoModelCfg(blocks=blocks, stem_chs=8, stem_type='3x3', stem_pool='', downsample='',
                            act_layer='silu', **extra)
  model = byobnet.ByobNet(cfg, num_classes=NUM_CLASSES)
  return model, 'timm.models.byobnet.ByobNet', dict(version=version, cfg=repr(cfg), num_classes=NUM_CLASSES)


# name: (builder of (timm model, class name, kwargs), image size, our registry name, our overrides, deploy form)
CONFIGS = {
    'fastvit': (_timm_fastvit, 48, 'fastvit_sa12', _FASTVIT_OURS, True),
    'mobilevit': (lambda: _timm_mobilevit(1), 48, 'mobilevit_xxs',
                  dict(_MOBILEVIT_OURS, transformer_dims=(0, 0, 16, 24, 16), expand_ratio=2.0, final_width=40),
                  False),
    'mobilevitv2': (lambda: _timm_mobilevit(2), 48, 'mobilevitv2_050', _MOBILEVIT_OURS, False),
}


def randomize(model, seed: int) -> None:
  """Every parameter and BatchNorm running statistic random (norm weights around 1)."""
  import torch  # pylint: disable=g-import-not-at-top
  g = torch.Generator().manual_seed(seed)
  norms = tuple(n for n, m in model.named_modules()
                if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm, torch.nn.GroupNorm)))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.rsplit('.', 1)[0] in norms:
        p.copy_((1.0 if name.endswith('weight') else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.ndim == 1 else 0.15))
    make_fixtures.randomize_running_stats(model, g)


def _save(base: str, sd) -> None:
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  save_file({k: v.detach().contiguous().clone() for k, v in sd.items()}, base + '.safetensors')
  os.chmod(base + '.safetensors', 0o644)


def make(name: str, seed: int = 0) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  from timm.models import reparameterize_model  # pylint: disable=g-import-not-at-top
  build, size, model_name, overrides, deploy = CONFIGS[name]
  torch.manual_seed(seed)
  tmodel, cls_name, kwargs = build()
  tmodel.eval()
  randomize(tmodel, seed)
  x = np.random.default_rng(seed).standard_normal((2, 3, size, size)).astype(np.float32)
  with torch.no_grad():
    logits = tmodel(torch.from_numpy(x)).numpy()
  base = os.path.join(OUT_DIR, name)
  _save(base, tmodel.state_dict())
  arrays = dict(input_nhwc=x.transpose(0, 2, 3, 1), logits=logits)
  if deploy:
    fused = reparameterize_model(tmodel)
    with torch.no_grad():
      arrays['logits_reparam'] = fused(torch.from_numpy(x)).numpy()
    _save(base + '_reparam', fused.state_dict())
    arrays['num_params_reparam'] = np.asarray(sum(p.numel() for p in fused.parameters()))
  np.savez(base + '.npz', **arrays)
  meta = dict(timm_class=cls_name, timm_kwargs=kwargs, timm_version=__import__('timm').__version__,
              torch_version=torch.__version__, seed=seed, model=model_name, model_overrides=overrides,
              image_size=size, num_classes=NUM_CLASSES)
  with open(base + '.json', 'w') as f:
    json.dump(meta, f, indent=2, sort_keys=True, default=list)
    f.write('\n')
  for ext in ('.npz', '.json'):
    os.chmod(base + ext, 0o644)
  sizes = {ext: os.path.getsize(base + ext) for ext in ('.safetensors', '.npz', '.json')}
  print(f'{name}: logits |max| {np.abs(logits).max():.3f}, bytes {sizes}')


def main() -> None:
  make_fixtures._import_timm()  # pylint: disable=protected-access
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_grad_enabled(False)
  for name in sys.argv[1:] or list(CONFIGS):
    make(name)


if __name__ == '__main__':
  main()
