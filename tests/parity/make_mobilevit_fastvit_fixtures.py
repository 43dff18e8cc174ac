"""Regenerates the FastViT and MobileViT timm parity fixtures used by tests/test_fastvit.py and
tests/test_mobilevit.py (needs torch + timm; the tests do not).

    python tests/parity/make_mobilevit_fastvit_fixtures.py [fastvit ...]

Tiny configurations of timm's own model classes (the registered variants are megabytes; these are kilobytes),
every parameter random and every BatchNorm running statistic random (make_fixtures.randomize_running_stats), so
eval-mode BatchNorm and the re-parameterisation are checked with non-trivial statistics:

  fastvit   timm FastVit, 48 px: widths 8/16/32/64, depths 1/1/1/1, MLP ratios 3/3/3/2, RepMixer stages 0-2
            (stage 0 without downsampling), an attention stage 3 (2 heads of 32) after a 7x7 conditional positional encoding,
            final_conv to 128 with squeeze-excitation. Stage maps 12, 6, 3, 2 (odd sizes through the strided 7x7
            and 3x3 convs). Also saved: timm's `reparameterize_model` of it (fastvit_reparam.safetensors) and its
            logits ('logits_reparam'), the deploy form timm ships.

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


# name: (builder of (timm model, class name, kwargs), image size, our registry name, our overrides, deploy form)
CONFIGS = {
    'fastvit': (_timm_fastvit, 48, 'fastvit_sa12', _FASTVIT_OURS, True),
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
