"""Regenerates the ViViT, TimeSformer and AST parity fixtures used by tests/test_video_audio_models.py.

Needs torch and transformers (NOT needed by the tests themselves):

    python tests/parity/make_video_audio_fixtures.py [vivit timesformer ast]

For a tiny configuration of each Hugging Face reference (VivitForVideoClassification,
TimesformerForVideoClassification, ASTForAudioClassification) it sets every parameter to fixed random values
(norm weights near 1, so nothing is an identity: TimeSformer's temporal_fc and time embedding are non-zero), runs a
fixed input in eval mode and writes, under tests/parity/fixtures/:

  {name}.safetensors  the reference state dict (float32)
  {name}.npz          'input' in vit_jax's layout (videos NTHWC; spectrograms (B, mel_bins, frames)) and 'logits'
  {name}.json         reference class, config and versions, and the vit_jax model name, overrides and image size
"""
from __future__ import annotations

import json
import os

import numpy as np

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')
NUM_CLASSES = 5
BATCH = 2
_TINY = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
_OURS = dict(hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32)
# name: (transformers config class, model class, config kwargs, vit_jax model, overrides, image size, input shape
# in the reference's layout). ViViT: 4 frames of 16 px, tubelet 2x8x8 -> 2 x 2 x 2 tokens. TimeSformer: 4 frames,
# 8 px patches -> 2 x 2 per frame. AST: 32 mel x 64 frames, 8x8 patches, strides 6 (frequency) and 5 (time)
# -> 5 x 12 patches (unequal strides check the frequency-major token order).
CONFIGS = {
    'vivit': ('VivitConfig', 'VivitForVideoClassification',
              dict(image_size=16, num_frames=4, tubelet_size=[2, 8, 8], **_TINY), 'vivit_b16x2_st',
              dict(num_frames=4, tubelet_size=2, patch_size=8, **_OURS), 16, (BATCH, 4, 3, 16, 16)),
    'timesformer': ('TimesformerConfig', 'TimesformerForVideoClassification',
                    dict(image_size=16, num_frames=4, patch_size=8, **_TINY), 'timesformer_b16',
                    dict(num_frames=4, patch_size=8, **_OURS), 16, (BATCH, 4, 3, 16, 16)),
    'ast': ('ASTConfig', 'ASTForAudioClassification',
            dict(num_mel_bins=32, max_length=64, patch_size=8, frequency_stride=6, time_stride=5, **_TINY),
            'ast_b16', dict(time_frames=64, patch_size=8, frequency_stride=6, time_stride=5, layer_norm_eps=1e-12,
                            **_OURS), 32, (BATCH, 64, 32)),
}


def _randomize(model, seed: int) -> None:
  """Every parameter random: norm weights N(1, 0.2), biases N(0, 0.2), the rest N(0, 0.1)."""
  import torch  # pylint: disable=g-import-not-at-top
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 and 'norm' in name and name.endswith('weight'):
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.ndim == 1 else 0.1))


def _ours(name: str, x: np.ndarray) -> np.ndarray:
  """The reference input in vit_jax's layout: (B, T, C, H, W) -> NTHWC; (B, time, mel) -> (B, mel, time)."""
  return x.transpose(0, 1, 3, 4, 2) if name != 'ast' else x.transpose(0, 2, 1)


def make(name: str, seed: int = 0) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top

  config_cls, model_cls, kwargs, model, overrides, size, shape = CONFIGS[name]
  torch.manual_seed(seed)
  config = getattr(transformers, config_cls)(num_labels=NUM_CLASSES, **kwargs)
  ref = getattr(transformers, model_cls)(config).eval()
  _randomize(ref, seed)
  x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
  with torch.no_grad():
    logits = ref(torch.from_numpy(x)).logits.numpy()
  sd = {k: v.detach().contiguous().clone() for k, v in ref.state_dict().items()}
  base = os.path.join(OUT_DIR, name)
  save_file(sd, base + '.safetensors')
  np.savez(base + '.npz', input=_ours(name, x), logits=logits)
  meta = dict(reference_class=f'transformers.{model_cls}', reference_kwargs=kwargs, seed=seed, model=model,
              model_overrides=overrides, image_size=size, num_classes=NUM_CLASSES, layout='hf',
              torch_version=torch.__version__, transformers_version=transformers.__version__)
  with open(base + '.json', 'w') as f:
    json.dump(meta, f, indent=2, sort_keys=True)
    f.write('\n')
  for ext in ('.safetensors', '.npz', '.json'):
    os.chmod(base + ext, 0o644)
  print(f'{name}: {len(sd)} tensors, logits |max| {np.abs(logits).max():.3f}, '
        f'bytes {os.path.getsize(base + ".safetensors")}')


def main() -> None:
  import sys  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_grad_enabled(False)
  for name in sys.argv[1:] or list(CONFIGS):
    make(name)


if __name__ == '__main__':
  main()
