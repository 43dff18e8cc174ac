"""DINO's dynamics at toy scale in PyTorch, as the official code computes them: is a collapse ours or DINO's?

A timm ViT (16 px digits, 4 px patches, width 32, depth 2) with the official DINOHead layout (3-layer MLP, L2
normalisation, weight-normalised last layer with its norm frozen at 1) and DINOLoss (centring, sharpening, EMA
teacher), trained on two pad-and-crop + flip views of scikit-learn's digits. It prints the teacher's mean entropy
(ln K: the uniform collapse) and the k-NN accuracy (k=20, T=0.07) of the teacher's class token against a randomly
initialised network's, for comparison with vit_jax's DINO on the same data (configs/dino_digits.py):

    python experiments/dino_reference_torch.py --lr 1e-3 --momentum 0.99 --teacher_temp 0.04 --out_dim 256

Needs torch and timm (not in requirements.txt: this is a cross-check, not part of the package).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
from sklearn.datasets import load_digits

try:
  import timm
  import torch
  from torch import nn
  from torch.nn import functional as F
except ImportError:
  sys.exit('This cross-check needs torch and timm: pip install torch timm')

WIDTH, BOTTLENECK, HIDDEN, BATCH = 32, 32, 64, 64


def digit_images() -> tuple[np.ndarray, np.ndarray]:
  """(1797, 16, 16, 3) digits in [-1, 1] (8x8 upsampled by 2) and their labels."""
  d = load_digits()
  x = np.repeat(np.repeat(d.images.astype(np.float32) / 16.0, 2, 1), 2, 2)
  return np.repeat(x[..., None], 3, -1) * 2 - 1, d.target


def view_batches(images: np.ndarray, steps: int, seed: int):
  """Per step, two views (pad 3, random 16 px crop, flip p 0.5) of the same BATCH random images."""
  rng = np.random.RandomState(seed)
  padded = np.pad(images, ((0, 0), (3, 3), (3, 3), (0, 0)), constant_values=-1)
  for _ in range(steps):
    idx = rng.randint(0, len(images), BATCH)
    pair = []
    for _ in range(2):
      out = np.empty((BATCH, 16, 16, 3), np.float32)
      for j, i in enumerate(idx):
        dy, dx = rng.randint(0, 7, 2)
        crop = padded[i, dy:dy + 16, dx:dx + 16]
        out[j] = crop[:, ::-1] if rng.rand() < 0.5 else crop
      pair.append(out)
    yield pair


def knn_top1(features: np.ndarray, labels: np.ndarray, n_train: int = 1437) -> float:
  """DINO's weighted k-NN (k=20, T=0.07, cosine) with the first n_train images as the train set."""
  f = features / np.linalg.norm(features, axis=1, keepdims=True)
  sim = f[n_train:] @ f[:n_train].T
  top = np.argsort(-sim, 1)[:, :20]
  weights = np.exp(np.take_along_axis(sim, top, 1) / 0.07)
  votes = np.stack([(weights * (labels[:n_train][top] == c)).sum(1) for c in range(10)], 1)
  return float((votes.argmax(1) == labels[n_train:]).mean())


class DinoNet(nn.Module):
  """timm ViT backbone (class token) + DINOHead."""

  def __init__(self, out_dim: int):
    super().__init__()
    self.backbone = timm.create_model('vit_tiny_patch16_224', img_size=16, patch_size=4, embed_dim=WIDTH, depth=2,
                                      num_heads=2, mlp_ratio=2.0, num_classes=0, drop_path_rate=0.1)
    self.mlp = nn.Sequential(nn.Linear(WIDTH, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN), nn.GELU(),
                             nn.Linear(HIDDEN, BOTTLENECK))
    for m in self.mlp:
      if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(BOTTLENECK, out_dim, bias=False))
    self.last_layer.parametrizations.weight.original0.data.fill_(1)
    self.last_layer.parametrizations.weight.original0.requires_grad = False

  def forward(self, x):
    return self.last_layer(F.normalize(self.mlp(self.backbone(x)), dim=-1))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--lr', type=float, default=1e-3)
  parser.add_argument('--momentum', type=float, default=0.99)
  parser.add_argument('--teacher_temp', type=float, default=0.04)
  parser.add_argument('--out_dim', type=int, default=256)
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  torch.manual_seed(args.seed)
  images, labels = digit_images()
  to_torch = lambda x: torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
  student, teacher = DinoNet(args.out_dim), DinoNet(args.out_dim)
  teacher.load_state_dict(student.state_dict())
  for p in teacher.parameters():
    p.requires_grad = False
  center = torch.zeros(1, args.out_dim)
  opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.04)
  for step, (a, b) in enumerate(view_batches(images, args.steps + 1, args.seed)):
    views = torch.cat([to_torch(a), to_torch(b)])
    with torch.no_grad():
      t_out = teacher(views).chunk(2)
    s_out = student(views).chunk(2)
    t_probs = [F.softmax((t - center) / args.teacher_temp, -1) for t in t_out]
    loss = sum(torch.sum(-t_probs[i] * F.log_softmax(s_out[v] / 0.1, -1), -1).mean()
               for i in range(2) for v in range(2) if v != i) / 2
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
      for ps, pt in zip(student.parameters(), teacher.parameters()):
        pt.mul_(args.momentum).add_((1 - args.momentum) * ps.detach())
      center = center * 0.9 + torch.cat(t_out).mean(0, keepdim=True) * 0.1
      entropy = float(torch.stack([-(p * torch.log(p + 1e-30)).sum(-1).mean() for p in t_probs]).mean())
    if step % 50 == 0:
      print(f'step {step}  loss {float(loss):.3f}  teacher entropy {entropy:.3f} (uniform: '
            f'{np.log(args.out_dim):.3f})', flush=True)
  teacher.eval()
  with torch.no_grad():
    trained = knn_top1(teacher.backbone(to_torch(images)).numpy(), labels)
    random_init = knn_top1(DinoNet(args.out_dim).eval().backbone(to_torch(images)).numpy(), labels)
  print(f'k-NN top-1: teacher {trained:.3f}, random init {random_init:.3f}')


if __name__ == '__main__':
  main()
