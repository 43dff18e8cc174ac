"""Regenerates the EfficientFormer / EfficientViT (MIT) timm parity fixtures (needs torch + timm; the tests do not).

    python tests/parity/make_efficientformer_efficientvit_fixtures.py [name ...]

Tiny configurations of timm's classes, every parameter and BatchNorm running statistic random:
  efficientformer           timm EfficientFormer, depths (1, 1, 1, 2), widths (8, 16, 16, 24), num_vit=1: the last
                            stage is [4-D block, flatten, 3-D block] (l1's layout); 96 px input, so the last map is
                            3x3 and its attention modules are rebuilt as timm Attention(resolution=3, key_dim=8,
                            num_heads=2, attn_ratio=2) (timm fixes 7x7 / 8 heads of 32 otherwise);
  efficientformer_allvit    the same with num_vit=2 >= the last depth: flatten first, only 3-D blocks (l7's layout).
  efficientformerv2         timm EfficientFormerV2, depths (1, 1, 2, 2), widths (8, 16, 16, 24), num_vit=1, mlp
                            ratios (4, 4, (4, 3), (3, 4)), img_size 96 (maps 24, 12, 6, 3): one strided attention
                            block in stage 2, the downsampling attention and one attention block in stage 3; its
                            attention modules rebuilt as timm Attention2d(key_dim=8, num_heads=2, attn_ratio=2) /
                            Attention2dDownsample(key_dim=4, num_heads=2, attn_ratio=2);
  efficientvit_mit          timm EfficientVit (B), widths (4, 8, 16, 16, 24), depths (1, 2, 1, 1, 2), head_dim 8,
                            head widths (32, 40), 64 px: a stem DSConv, a residual and a lone strided MBConv stage,
                            attention stages of 2 and 3 heads (one and two EfficientViT blocks).
Files, as make_fixtures.py: {name}.safetensors (timm state dict), {name}.npz (input_nhwc, logits), {name}.json
(timm class and kwargs, our model name and overrides).
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

_EF_ATTN = dict(key_dim=8, num_heads=2, attn_ratio=2, resolution=3)
_EF_TIMM = dict(depths=(1, 1, 1, 2), embed_dims=(8, 16, 16, 24))
_EF_OURS = dict(depths=(1, 1, 1, 2), embed_dims=(8, 16, 16, 24), attn_key_dim=8, attn_heads=2, attn_ratio=2.0,
                attn_resolution=3, drop_path_rate=0.0)
_V2_TIMM = dict(depths=(1, 1, 2, 2), embed_dims=(8, 16, 16, 24), num_vit=1, mlp_ratios=(4, 4, (4, 3), (3, 4)),
                img_size=96)
_V2_OURS = dict(_V2_TIMM, attn_key_dim=8, attn_heads=2, attn_ratio=2.0, downsample_key_dim=4, drop_path_rate=0.0)
_EV = dict(widths=(4, 8, 16, 16, 24), depths=(1, 2, 1, 1, 2), head_dim=8, head_widths=(32, 40))
# name: (builder, timm kwargs, image size, our registry name, our overrides)
CONFIGS = {
    'efficientformer': ('_timm_efficientformer', dict(_EF_TIMM, num_vit=1), 96, 'efficientformer_l1',
                        dict(_EF_OURS, num_vit=1)),
    'efficientformer_allvit': ('_timm_efficientformer', dict(_EF_TIMM, num_vit=2), 96, 'efficientformer_l7',
                               dict(_EF_OURS, num_vit=2)),
    'efficientformerv2': ('_timm_efficientformerv2', _V2_TIMM, 96, 'efficientformerv2_s0', _V2_OURS),
    'efficientvit_mit': ('_timm_efficientvit', _EV, 64, 'efficientvit_b0', _EV),
}


def _timm_efficientformerv2(kwargs):
  """timm's EfficientFormerV2 with its attention modules rebuilt smaller (timm's own classes and options)."""
  from timm.models import efficientformer_v2 as v2  # pylint: disable=g-import-not-at-top
  model = v2.EfficientFormerV2(num_classes=NUM_CLASSES, **kwargs)
  small = dict(num_heads=2, attn_ratio=2)
  for stage in model.stages:
    attn = getattr(stage.downsample, 'attn', None)
    if attn is not None:
      stage.downsample.attn = v2.Attention2dDownsample(
          dim=attn.k.conv.in_channels, key_dim=4, resolution=attn.resolution, out_dim=attn.out_dim, **small)
    for block in stage.blocks:
      mixer = block.token_mixer
      if mixer is not None:
        stride = 2 if mixer.stride_conv is not None else None
        side = tuple(r * (stride or 1) for r in mixer.resolution)
        block.token_mixer = v2.Attention2d(mixer.q.conv.in_channels, key_dim=8, resolution=side, stride=stride,
                                           **small)
  return model


def _timm_efficientvit(kwargs):
  from timm.models import efficientvit_mit  # pylint: disable=g-import-not-at-top
  return efficientvit_mit.EfficientVit(num_classes=NUM_CLASSES, **kwargs)


def _timm_efficientformer(kwargs):
  """timm's EfficientFormer with its attention modules rebuilt for the tiny map (timm Attention's own options)."""
  from timm.models import efficientformer  # pylint: disable=g-import-not-at-top
  model = efficientformer.EfficientFormer(num_classes=NUM_CLASSES, **kwargs)
  for block in model.stages[-1].blocks:
    if isinstance(block, efficientformer.MetaBlock1d):
      dim = block.norm1.normalized_shape[0]
      block.token_mixer = efficientformer.Attention(dim, **_EF_ATTN)
  return model


def randomize(model, seed: int) -> None:
  """Every parameter random (norm weights around 1) and random BatchNorm running statistics."""
  import torch  # pylint: disable=g-import-not-at-top
  g = torch.Generator().manual_seed(seed)
  norms = tuple(n for n, m in model.named_modules()
                if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d, torch.nn.LayerNorm, torch.nn.GroupNorm)))
  with torch.no_grad():
    for name, p in model.named_parameters():
      module = name.rsplit('.', 1)[0]
      if module in norms:
        p.copy_((1.0 if name.endswith('weight') else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.ndim == 1 else 0.15))
    make_fixtures.randomize_running_stats(model, g)


def make(name: str, seed: int = 0) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  builder, tkw, size, model_name, overrides = CONFIGS[name]
  torch.manual_seed(seed)
  tmodel = globals()[builder](tkw).eval()
  randomize(tmodel, seed)
  x = np.random.default_rng(seed).standard_normal((1, 3, size, size)).astype(np.float32)
  with torch.no_grad():
    logits = tmodel(torch.from_numpy(x)).numpy()
  sd = {k: v.detach().contiguous().clone() for k, v in tmodel.state_dict().items()}
  base = os.path.join(OUT_DIR, name)
  save_file(sd, base + '.safetensors')
  np.savez(base + '.npz', input_nhwc=x.transpose(0, 2, 3, 1), logits=logits)
  meta = dict(timm_builder=builder, timm_kwargs=dict(tkw, num_classes=NUM_CLASSES),
              timm_attention={'_timm_efficientformer': _EF_ATTN, '_timm_efficientformerv2': dict(
                  key_dim=8, downsample_key_dim=4, num_heads=2, attn_ratio=2)}.get(builder),
              timm_version=__import__('timm').__version__, torch_version=torch.__version__, seed=seed,
              model=model_name, model_overrides=overrides, image_size=size, num_classes=NUM_CLASSES)
  with open(base + '.json', 'w') as f:
    json.dump(meta, f, indent=2, sort_keys=True, default=list)
    f.write('\n')
  for ext in ('.safetensors', '.npz', '.json'):
    os.chmod(base + ext, 0o644)
  sizes = {ext: os.path.getsize(base + ext) for ext in ('.safetensors', '.npz', '.json')}
  print(f'{name}: {len(sd)} tensors, logits |max| {np.abs(logits).max():.3f}, bytes {sizes}')


def main() -> None:
  make_fixtures._import_timm()  # pylint: disable=protected-access
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_grad_enabled(False)
  for name in sys.argv[1:] or list(CONFIGS):
    make(name)


if __name__ == '__main__':
  main()
