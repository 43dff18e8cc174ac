"""Regenerates the XCiT (timm) and CvT (Hugging Face transformers) parity fixtures used by tests/test_zoo_b.py.

Needs torch, timm and transformers (NOT needed by the tests themselves):

    python tests/parity/make_zoo_b_fixtures.py [xcit_p16 xcit_p8 cvt]

For a tiny configuration of each, it builds the reference model, replaces every parameter AND every BatchNorm
running statistic with fixed random values (so converted `batch_stats` matter: running means N(0, 0.2), running
variances U(0.5, 1.5)), runs a fixed input in eval mode and writes, under tests/parity/fixtures/:

  {name}.safetensors  the reference state dict (float32; BatchNorm num_batches_tracked included, as checkpoints have)
  {name}.npz          'input_nhwc' (B, H, W, 3) and 'logits' (B, classes)
  {name}.json         reference class, kwargs and versions, and the vit_jax model name, overrides and image size
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

OUT_DIR = make_fixtures.OUT_DIR
NUM_CLASSES = 5
BATCH = 2
SIZE = 32

_XCIT = dict(embed_dim=16, depth=2, num_heads=2, cls_attn_layers=2, mlp_ratio=2.0)
_CVT = dict(embed_dim=[8, 16, 24], num_heads=[1, 2, 3], depth=[1, 2, 3], mlp_ratio=[2.0, 2.0, 2.0])
# name: (reference builder kwargs, vit_jax model, vit_jax overrides). 32 px: XCiT p16 -> a 2x2 grid after a 4-conv
# stem (widths 2, 4, 8, 16); p8 -> 4x4 after 3 convs; CvT stage maps 8, 4, 2 with key/value maps 4, 2, 1 (depths
# 1, 2, 3: transformers indexes each stage's drop-path ramp by the stage number, so depth[i] must exceed i).
CONFIGS = {
    'xcit_p16': (dict(patch_size=16, eta=1.0, tokens_norm=True, **_XCIT), 'xcit_t12_p16',
                 dict(patch_size=16, embed_dim=16, depth=2, num_heads=2, cls_attn_layers=2, mlp_ratio=2.0)),
    'xcit_p8': (dict(patch_size=8, eta=1.0, tokens_norm=True, **_XCIT), 'xcit_t12_p8',
                dict(patch_size=8, embed_dim=16, depth=2, num_heads=2, cls_attn_layers=2, mlp_ratio=2.0)),
    'cvt': (_CVT, 'cvt_13', dict(embed_dims=(8, 16, 24), num_heads=(1, 2, 3), depths=(1, 2, 3), mlp_ratio=2.0)),
}


def _reference(name: str, kwargs: dict):
  if name.startswith('xcit'):
    from timm.models.xcit import Xcit  # pylint: disable=g-import-not-at-top
    return Xcit(img_size=SIZE, num_classes=NUM_CLASSES, drop_path_rate=0.0, **kwargs), 'timm.models.xcit.Xcit'
  from transformers import CvtConfig, CvtForImageClassification  # pylint: disable=g-import-not-at-top
  config = CvtConfig(num_labels=NUM_CLASSES, drop_path_rate=[0.0, 0.0, 0.0], **kwargs)
  return CvtForImageClassification(config), 'transformers.CvtForImageClassification'


def _randomize(model, seed: int) -> None:
  """Every parameter and BatchNorm statistic random; norm weights near 1, XCA temperatures positive."""
  import torch  # pylint: disable=g-import-not-at-top
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('temperature'):
        p.copy_(torch.rand(p.shape, generator=g) + 0.5)
      elif p.ndim == 1 and ('norm' in name or '.bn.' in name or name.split('.')[-2] == '1'):
        base = 1.0 if name.endswith('weight') else 0.0
        p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.ndim == 1 else 0.1))
    make_fixtures.randomize_running_stats(model, g)


def make(name: str, seed: int = 0) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top

  kwargs, model, overrides = CONFIGS[name]
  torch.manual_seed(seed)
  ref, cls_name = _reference(name, kwargs)
  ref = ref.eval()
  _randomize(ref, seed)
  x = np.random.default_rng(seed).standard_normal((BATCH, 3, SIZE, SIZE)).astype(np.float32)
  with torch.no_grad():
    out = ref(torch.from_numpy(x))
  logits = (out.logits if hasattr(out, 'logits') else out).numpy()
  sd = {k: v.detach().contiguous().clone() for k, v in ref.state_dict().items()}
  base = os.path.join(OUT_DIR, name)
  save_file(sd, base + '.safetensors')
  np.savez(base + '.npz', input_nhwc=x.transpose(0, 2, 3, 1), logits=logits)
  versions = dict(torch_version=torch.__version__, timm_version=__import__('timm').__version__,
                  transformers_version=__import__('transformers').__version__)
  meta = dict(reference_class=cls_name, reference_kwargs=kwargs, seed=seed, model=model, model_overrides=overrides,
              image_size=SIZE, num_classes=NUM_CLASSES, **versions)
  with open(base + '.json', 'w') as f:
    json.dump(meta, f, indent=2, sort_keys=True)
    f.write('\n')
  for ext in ('.safetensors', '.npz', '.json'):
    os.chmod(base + ext, 0o644)
  print(f'{name}: {len(sd)} tensors, logits |max| {np.abs(logits).max():.3f}, '
        f'bytes {os.path.getsize(base + ".safetensors")}')


def main() -> None:
  make_fixtures._import_timm()  # pylint: disable=protected-access
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_grad_enabled(False)
  for name in sys.argv[1:] or list(CONFIGS):
    make(name)


if __name__ == '__main__':
  main()
