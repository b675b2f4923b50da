"""Converts a published PyTorch checkpoint into msjax's ``.npz`` weights.

    python -m msjax.models.convert --arch bninception --src bn_inception-52deb4733.pth \\
        --out bninception.npz
    python -m msjax.models.convert --arch resnet50 --src resnet50-11ad3fa6.pth \\
        --out resnet50.npz

Needs torch (``pip install -e '.[convert]'``), for this command only. The state dict must
hold exactly the architecture's keys and shapes (the ImageNet classifier and BatchNorm's
``num_batches_tracked`` are ignored; a ``module.`` prefix from DataParallel and a
``{"state_dict": ...}`` wrapper are unwrapped). Anything else is reported key by key and
nothing is written. Configs then load the file with ``model.pretrained=PATH``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from flax import nnx

from msjax.models import BACKBONES, create_backbone, weights

CONVERTIBLE = ("bninception", "resnet50")


def read_state_dict(src: str) -> dict:
  try:
    import torch
  except ImportError:
    raise SystemExit("Converting needs PyTorch: pip install -e '.[convert]' (the CPU "
                     "build, torch==2.13.0).") from None
  from etils import epath
  import io
  path = epath.Path(src)
  if not path.exists():
    raise SystemExit(f"--src {src}: no such file. Download the published checkpoint "
                     "first (see docs/models.md, 'Pretrained weights').")
  try:
    obj = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - report any unreadable file the same way
    raise SystemExit(f"--src {src} is not a readable PyTorch checkpoint: {e}") from None
  for wrapper in ("state_dict", "model"):
    if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
      obj = obj[wrapper]
  if not isinstance(obj, dict):
    raise SystemExit(f"--src {src} holds a {type(obj).__name__}, not a state dict.")
  if obj and all(k.startswith("module.") for k in obj):
    obj = {k[len("module."):]: v for k, v in obj.items()}
  return obj


def convert(arch: str, src: str, out: str) -> dict:
  """Converts ``src`` for ``arch`` and writes ``out``; returns the converted arrays."""
  state_dict = read_state_dict(src)
  model = create_backbone(arch, rngs=nnx.Rngs(0))
  ignore = importlib.import_module(BACKBONES[arch][0]).TORCH_IGNORE
  try:
    arrays = weights.convert_state_dict(model, state_dict, ignore_prefixes=ignore)
  except ValueError as e:
    raise SystemExit(f"--src {src} is not a {arch} checkpoint.\n{e}") from None
  weights.save_npz(out, arrays, arch)
  return arrays


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m msjax.models.convert",
                              description=__doc__.split("\n")[0])
  p.add_argument("--arch", required=True, choices=CONVERTIBLE)
  p.add_argument("--src", required=True, help="the PyTorch .pth state dict")
  p.add_argument("--out", required=True, help="the .npz to write (local or gs://)")
  args = p.parse_args(argv)
  arrays = convert(args.arch, args.src, args.out)
  count = sum(a.size for a in arrays.values())
  print(f"wrote {args.out}: {args.arch}, {len(arrays)} arrays, {count:,} values")


if __name__ == "__main__":
  sys.exit(main())
