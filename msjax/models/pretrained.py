"""Pretrained weights by name: ``config.model.pretrained="vit_s16_dino"``.

A name in ``PUBLISHED`` stands for one published PyTorch checkpoint: its publisher's
address, the hash the publisher gives for it, and the architecture it fits. The first
use downloads the file, checks it is complete and its hash, converts it to msjax's
``.npz`` (``msjax.models.convert``, no torch needed) and writes that, atomically, into
the cache directory; every later use loads the cached file without a request.

    python -m msjax.models.pretrained list
    python -m msjax.models.pretrained fetch vit_s16_dino [--cache gs://bucket/weights]

The cache is ``config.model.weights_cache`` (local or ``gs://``), by default
``$MSJAX_WEIGHTS_CACHE`` or ``~/.cache/msjax/weights``; a name's file is
``<cache>/<name>.npz``. Offline, or when the file's hash is not the published one, the
run stops before anything is compiled, with the address, the expected hash and the
commands that do the same by hand. A file that arrives short, or is cut anywhere, is
refused and nothing is cached.

Hashes are the publishers' own. Where only a prefix of the SHA-256 is published (torch
hub's convention: ``resnet50-0676ba61.pth``), that prefix is what is checked. Meta
publishes no hash for the DINO and DINOv2 files, so for those the check is that the
download is complete (its ``Content-Length``, and a checkpoint that parses whole with
exactly the architecture's keys and shapes); the SHA-256 of what was downloaded is
printed and kept in the cached file, and ``config.model.pretrained_sha256`` pins it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import http.client
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request

from etils import epath

from msjax.models import weights

CACHE_ENV = "MSJAX_WEIGHTS_CACHE"
_CHUNK = 1 << 20


class WeightsError(ValueError):
  """A named checkpoint could not be fetched, verified or converted."""


@dataclasses.dataclass(frozen=True)
class Published:
  """One published checkpoint: architecture, address, and the publisher's hash."""

  arch: str
  url: str
  source: str              # who publishes it, and what it is
  sha256: str = ""         # the full SHA-256, where the publisher gives it
  hash_prefix: str = ""    # the SHA-256 prefix in the file name (torch hub's convention)

  @property
  def filename(self) -> str:
    return self.url.rsplit("/", 1)[-1]

  def expected(self, pinned: str = "") -> str:
    """The check this file must pass, in words."""
    if pinned:
      return f"SHA-256 {pinned} (config.model.pretrained_sha256)"
    if self.sha256:
      return f"SHA-256 {self.sha256}"
    if self.hash_prefix:
      return (f"a SHA-256 starting {self.hash_prefix} (the prefix in the file name; the "
              "full hash is not published)")
    return "no published hash (a complete download is all that can be checked)"

  def matches(self, digest: str, pinned: str = "") -> bool:
    want = (pinned or self.sha256).lower()
    if want:
      return digest == want
    return digest.startswith(self.hash_prefix.lower())


PUBLISHED = {
    "bninception_imagenet": Published(
        "bninception", "http://data.lip6.fr/cadene/pretrainedmodels/bn_inception-52deb4733.pth",
        "BN-Inception on ImageNet (Cadene's pretrainedmodels), the released MS code's",
        hash_prefix="52deb4733"),
    "resnet50_imagenet": Published(
        "resnet50", "https://download.pytorch.org/models/resnet50-0676ba61.pth",
        "ResNet-50 on ImageNet, torchvision's IMAGENET1K_V1 (the weights metric-learning "
        "papers use)", hash_prefix="0676ba61"),
    "vit_s16_dino": Published(
        "vit_s16",
        "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/"
        "dino_deitsmall16_pretrain.pth",
        "ViT-S/16 self-supervised on ImageNet with DINO (Caron et al., ICCV 2021)"),
    "vit_b16_dino": Published(
        "vit_b16",
        "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/"
        "dino_vitbase16_pretrain.pth",
        "ViT-B/16 self-supervised on ImageNet with DINO (Caron et al., ICCV 2021)"),
    "vit_s14_dinov2": Published(
        "vit_s14",
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth",
        "ViT-S/14 distilled from DINOv2 ViT-g on LVD-142M (Oquab et al., TMLR 2024)"),
    "vit_s14_reg4_dinov2": Published(
        "vit_s14_reg4",
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/"
        "dinov2_vits14_reg4_pretrain.pth",
        "ViT-S/14 DINOv2 with 4 register tokens (Darcet et al., ICLR 2024)"),
}


def is_name(spec) -> bool:
  """Whether ``config.model.pretrained`` names a published checkpoint (not a path)."""
  return isinstance(spec, str) and spec in PUBLISHED


def cache_dir(setting: str = "") -> epath.Path:
  """The cache: ``setting``, else ``$MSJAX_WEIGHTS_CACHE``, else ``~/.cache/msjax/weights``."""
  return epath.Path(setting or os.environ.get(CACHE_ENV)
                    or os.path.join(os.path.expanduser("~"), ".cache", "msjax", "weights"))


def cached_path(name: str, cache: str = "") -> epath.Path:
  return cache_dir(cache) / f"{name}.npz"


def manual_steps(name: str, cache: str = "", pinned: str = "") -> str:
  """The commands that fetch, check and convert ``name`` by hand."""
  p = PUBLISHED[name]
  dest = cached_path(name, cache)
  check = pinned or p.sha256 or p.hash_prefix
  return (f"To do it by hand: download {p.url}, check that `sha256sum {p.filename}` "
          + (f"gives {check}" if pinned or p.sha256 else
             f"starts with {check}" if check else "is what you expect")
          + f", then `python -m msjax.models.convert --arch {p.arch} --src {p.filename} "
          f"--out {dest}` (or --out any path, and set config.model.pretrained to it).")


def resolve(spec, arch: str, *, cache: str = "", pinned: str = "", log=print):
  """``config.model.pretrained`` as a file to load: ``None`` for ``""`` (random weights),
  the cached ``.npz`` for a name in ``PUBLISHED`` (fetched on first use), else ``spec``
  itself (a converted file's path).

  Raises:
    WeightsError: the name's architecture is not ``arch``, or the fetch failed (no
      network, an HTTP error, a short or wrong file); the message gives the address,
      the expected hash and the manual steps.
  """
  if not spec:
    return None
  if not is_name(spec):
    return spec
  p = PUBLISHED[spec]
  if p.arch != arch:
    raise WeightsError(f"config.model.pretrained={spec!r} holds {p.arch} weights but "
                       f"config.model.backbone={arch!r}; set --config.model.backbone="
                       f"{p.arch} or pick weights for {arch} "
                       f"({names_for(arch) or 'none are published'}).")
  return fetch(spec, cache=cache, pinned=pinned, log=log)


def names_for(arch: str) -> list[str]:
  return [n for n, p in PUBLISHED.items() if p.arch == arch]


def fetch(name: str, *, cache: str = "", pinned: str = "", log=print) -> epath.Path:
  """The cached ``.npz`` of ``name``: loaded from the cache, or downloaded, verified,
  converted and written there first."""
  if name not in PUBLISHED:
    raise WeightsError(f"{name!r} is not a published checkpoint msjax knows; choose one "
                       f"of {sorted(PUBLISHED)}.")
  dest = cached_path(name, cache)
  pinned = pinned.lower()
  if dest.exists():
    if pinned:  # the cache was filled from a download whose hash is recorded in it
      got = (weights.read_source(dest) or {}).get("sha256")
      if got != pinned:
        raise WeightsError(
            f"{dest} was converted from a download with SHA-256 {got}, not the pinned "
            f"{pinned} (config.model.pretrained_sha256); delete it to fetch again.")
    return dest
  p = PUBLISHED[name]
  log(f"Pretrained weights {name}: first use, downloading {p.url}")
  with tempfile.TemporaryDirectory(prefix="msjax-weights-") as tmp:
    local = os.path.join(tmp, p.filename)
    start = time.perf_counter()
    digest, size = _download(p.url, local, name, cache, pinned)
    seconds = time.perf_counter() - start
    if not p.matches(digest, pinned):
      raise WeightsError(
          f"{p.url} downloaded ({size:,} bytes) but its SHA-256 is {digest}; expected "
          f"{p.expected(pinned)}. Nothing was cached. The file may have been replaced "
          f"or corrupted on the way; retry, or check it yourself. "
          + manual_steps(name, cache, pinned))
    checked = pinned or p.sha256 or p.hash_prefix
    log(f"  {size / 1e6:.1f} MB in {seconds:.1f} s, SHA-256 {digest} "
        f"({'matches ' if checked else ''}{p.expected(pinned)})")
    from msjax.models import convert, torch_files
    try:
      with open(local, "rb") as f:
        state_dict = torch_files.read_state_dict_bytes(f.read(), p.url)
      arrays = convert.convert_checkpoint(p.arch, state_dict)
    except ValueError as e:  # CheckpointFileError included
      raise WeightsError(f"{p.url} (SHA-256 {digest}) is not a usable {p.arch} "
                         f"checkpoint: {e}\nNothing was cached.") from None
  source = dict(name=name, url=p.url, sha256=digest, bytes=size)
  weights.save_npz(dest, arrays, p.arch, source=source)
  log(f"  converted {len(arrays)} arrays, cached at {dest}")
  return dest


def _download(url: str, path: str, name: str, cache: str, pinned: str) -> tuple[str, int]:
  """Streams ``url`` to ``path``: ``(sha256 hex, bytes)``. A transfer that ends before its
  ``Content-Length`` raises ``WeightsError``, as does any network or HTTP error."""
  sha = hashlib.sha256()
  size = 0
  try:
    request = urllib.request.Request(url, headers={"User-Agent": "msjax"})
    with urllib.request.urlopen(request, timeout=60) as response, open(path, "wb") as out:
      length = response.headers.get("Content-Length")
      while chunk := response.read(_CHUNK):
        sha.update(chunk)
        out.write(chunk)
        size += len(chunk)
  except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
    reason = getattr(e, "reason", None) or e
    raise WeightsError(
        f"Could not download pretrained weights {name!r} from {url}: {reason}. Its "
        f"check: {PUBLISHED[name].expected(pinned)}. This machine may be offline. "
        + manual_steps(name, cache, pinned)) from None
  if length is not None and size != int(length):
    raise WeightsError(
        f"The download of {url} stopped at {size:,} of {int(length):,} bytes; nothing was "
        "cached. Retry. " + manual_steps(name, cache, pinned))
  return sha.hexdigest(), size


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m msjax.models.pretrained",
                              description="List or fetch published pretrained weights.")
  sub = p.add_subparsers(dest="command", required=True)
  sub.add_parser("list", help="the names, their architectures, addresses and hashes")
  f = sub.add_parser("fetch", help="download, verify, convert and cache weights")
  f.add_argument("names", nargs="+", choices=sorted(PUBLISHED), metavar="NAME")
  f.add_argument("--cache", default="", help=f"cache directory (default ${CACHE_ENV} or "
                 "~/.cache/msjax/weights); local or gs://")
  args = p.parse_args(argv)
  if args.command == "list":
    for name, w in PUBLISHED.items():
      print(f"{name:22s} {w.arch:13s} {w.url}\n{'':36s} {w.expected()}\n{'':36s} {w.source}")
    return 0
  try:
    for name in args.names:
      print(fetch(name, cache=args.cache))
  except WeightsError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
