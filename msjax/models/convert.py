"""Converts a published PyTorch checkpoint into msjax's ``.npz`` weights.

    python -m msjax.models.convert --arch bninception --src bn_inception-52deb4733.pth \\
        --out bninception.npz
    python -m msjax.models.convert --arch resnet50 --src resnet50-0676ba61.pth \\
        --out resnet50.npz
    python -m msjax.models.convert --arch vit_s16 --src dino_deitsmall16_pretrain.pth \\
        --out vit_s16_dino.npz

``--src`` is a ``.pth`` (torch's zip or legacy format) or a ``.safetensors`` file, read
without torch (``msjax.models.torch_files``): the DINO and DINOv2 releases, timm's files,
torchvision's. The state dict must hold exactly the architecture's keys and shapes (the
ImageNet classifier, a ViT's ``head``, DINOv2's ``mask_token`` and BatchNorm's
``num_batches_tracked`` are ignored; ``module.``/``backbone.`` prefixes and
``{"state_dict": ...}``, ``{"model": ...}`` or DINO's ``{"teacher": ...}`` wrappers are
unwrapped; DINOv2's ``register_tokens`` are renamed and a position embedding of another
grid is resampled). Anything else is reported key by key and nothing is written. Configs
then load the file with ``model.pretrained=PATH``; ``msjax.models.pretrained`` does all
of this for the published files by name.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from flax import nnx

from msjax.models import BACKBONES, backbone_class, torch_files, vit, weights

CONVERTIBLE = tuple(BACKBONES)


def convert_checkpoint(arch: str, state_dict) -> dict:
  """A PyTorch state dict (``{key: array}``) as msjax ``{path: array}`` for ``arch``.

  Raises:
    ValueError: naming every missing, unexpected and misshapen key.
  """
  if arch not in CONVERTIBLE:
    raise ValueError(f"unknown architecture {arch!r}; choose one of {CONVERTIBLE}.")
  if arch in vit.SIZES:
    state_dict = vit.convert_checkpoint(state_dict, vit.SIZES[arch])
  # Shapes are all the conversion needs: the model is built abstract, nothing is run.
  model = nnx.eval_shape(lambda: backbone_class(arch)(rngs=nnx.Rngs(0)))
  ignore = importlib.import_module(BACKBONES[arch][0]).TORCH_IGNORE
  return weights.convert_state_dict(model, state_dict, ignore_prefixes=ignore)


def convert(arch: str, src: str, out: str) -> dict:
  """Converts ``src`` for ``arch`` and writes ``out``; returns the converted arrays."""
  from etils import epath
  if not epath.Path(src).exists():
    raise SystemExit(f"--src {src}: no such file. Download the published checkpoint "
                     "first (python -m msjax.models.pretrained list gives the addresses).")
  try:
    state_dict = torch_files.read_state_dict(src)
  except torch_files.CheckpointFileError as e:
    raise SystemExit(f"--src {src}: {e}") from None
  try:
    arrays = convert_checkpoint(arch, state_dict)
  except ValueError as e:
    raise SystemExit(f"--src {src} is not a {arch} checkpoint.\n{e}") from None
  weights.save_npz(out, arrays, arch)
  return arrays


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m msjax.models.convert",
                              description=__doc__.split("\n")[0])
  p.add_argument("--arch", required=True, choices=CONVERTIBLE)
  p.add_argument("--src", required=True, help="the PyTorch .pth or .safetensors file")
  p.add_argument("--out", required=True, help="the .npz to write (local or gs://)")
  args = p.parse_args(argv)
  arrays = convert(args.arch, args.src, args.out)
  count = sum(a.size for a in arrays.values())
  print(f"wrote {args.out}: {args.arch}, {len(arrays)} arrays, {count:,} values")


if __name__ == "__main__":
  sys.exit(main())
