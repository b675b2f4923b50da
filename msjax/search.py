"""Searches an embedded collection: each query's k nearest neighbours by cosine similarity.

  python -m msjax.search --embeddings photos.npz --query new.jpg --k 10
  python -m msjax.search --embeddings gallery.npz --queries query.npz --k 10 \\
      --out results.json --html results.html

The collection is a file written by ``python -m msjax.embed`` (a dataset split or a
folder of images). The queries are images (``--query``: one image file, or a folder
searched at any depth), embedded with the collection's own run and checkpoint as
``msjax.embed`` does; or another ``msjax.embed`` file (``--queries``), which must come
from a model of the same embedding dimension (a different run or checkpoint is allowed,
with a warning: its vectors live in another space).

The neighbours come from ``msjax.knn.top_k``, the tiled engine that retrieval evaluation
uses: exact, on every device, without the ``[N_query, N_collection]`` matrix, most similar
first and ties broken by the lower collection index. A query that is itself in the
collection finds itself first.

Output: a table on stdout (rank, similarity, path, label); ``--out FILE.json`` the same as
JSON::

  {"collection": ..., "k": 10, "model": {...},
   "queries": [{"path": ..., "label": ..., "neighbours":
                [{"rank": 1, "index": 17, "similarity": 0.93, "path": ..., "label": ...}]}]}

and ``--html FILE.html`` a self-contained page of thumbnails (``msjax.search_html``).
Labels are null where unknown (images from a folder). Bad input (a missing or foreign
file, a dimension mismatch, no query image, a query that is not an image) is one line on
stderr and exit status 1; outputs are written whole or not at all.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import numpy as np

from msjax import embed, evaluate, knn, search_html


class SearchError(ValueError):
  """Bad input to ``msjax.search``; the message says what is wrong and how to fix it."""


# ---------------------------------------------------------------------------- inputs


def load_collection(path) -> dict[str, Any]:
  """An ``msjax.embed`` file, checked; a ``SearchError`` says what is wrong with it."""
  if not os.path.exists(path) and "://" not in os.fspath(path):
    raise SearchError(f"{path}: no such file. Write one with python -m msjax.embed "
                      "--workdir RUN (--split test | --images DIR) --out FILE.npz.")
  try:
    data = embed.load(path)
  except Exception as e:  # noqa: BLE001 - not an NPZ at all: say so in one line
    raise SearchError(f"{path} is not an msjax.embed file ({type(e).__name__}: {e}).") from None
  if data.get("format") != embed.FORMAT or "embeddings" not in data:
    raise SearchError(f"{path} is not an msjax.embed file (format {data.get('format')!r}, "
                      f"expected {embed.FORMAT!r}); write it with python -m msjax.embed.")
  if len(data["embeddings"]) == 0:
    raise SearchError(f"{path} holds no embeddings (every image was skipped?).")
  return data


def _image_path(data: dict, i: int) -> str | None:
  """The file behind row ``i`` of an embeddings file, or None (synthetic, TFDS)."""
  root = data.get("root") or ""
  return os.path.join(root, str(data["paths"][i])) if root else None


def _label(data: dict, i: int):
  label = int(data["labels"][i])
  return None if label < 0 else label


def query_split(path: str):
  """The query images: one image file, or every image under a folder (``msjax.embed``'s
  rule), as a ``msjax.data.Split``."""
  from msjax.data import folder, records
  if os.path.isdir(path):
    return embed.image_folder(path)
  if not os.path.isfile(path):
    raise SearchError(f"--query {path}: no such file or folder.")
  if os.path.splitext(path)[1].lower() not in folder.IMAGE_EXTENSIONS:
    raise SearchError(f"--query {path} is not an image file (expected one of "
                      f"{' '.join(folder.IMAGE_EXTENSIONS)}).")
  root = os.path.dirname(os.path.abspath(path))
  return records.Split("images", records.ImageFiles(root, [os.path.basename(path)]),
                       np.zeros(1, np.int32), ("unknown",))


def embed_queries(collection: dict, path: str) -> dict[str, Any]:
  """Embeds the images at ``path`` with the collection's run and checkpoint."""
  from msjax import analysis, sharding
  split = query_split(path)
  sharding.initialize()
  run = analysis.load_run(collection["workdir"], step=int(collection["step"]),
                          load_data=False)
  result = embed.embed_split(run, split, known_labels=False, progress=False)
  if len(result.paths) == 0:
    reasons = "; ".join(f"{p}: {r}" for p, r in result.skipped)
    raise SearchError(f"--query {path}: no query image could be read ({reasons}).")
  return {"embeddings": result.embeddings, "labels": result.labels,
          "paths": np.asarray(result.paths, dtype=str), "root": result.root,
          "skipped": [p for p, _ in result.skipped]}


def check_same_model(collection: dict, queries: dict, names: tuple[str, str]) -> None:
  """Refuses queries of another dimension; warns about another run or checkpoint."""
  d_c, d_q = collection["embeddings"].shape[1], queries["embeddings"].shape[1]
  if d_c != d_q:
    raise SearchError(f"{names[1]} holds {d_q}-d embeddings but {names[0]} holds {d_c}-d: "
                      "they come from different models. Embed both with the same run.")
  same = all(collection.get(key) == queries.get(key) for key in ("workdir", "step"))
  if not same:
    print(f"warning: {names[1]} comes from {queries.get('workdir')} step "
          f"{queries.get('step')}, {names[0]} from {collection.get('workdir')} step "
          f"{collection.get('step')}: similarities across two models mean little.",
          file=sys.stderr)


# ---------------------------------------------------------------------------- search


def search(collection: dict, queries: dict, k: int, **top_k_kwargs) -> list[dict]:
  """Each query's ``k`` nearest neighbours in ``collection`` as JSON-ready records."""
  n = len(collection["embeddings"])
  if not 1 <= k:
    raise SearchError(f"--k {k} must be at least 1.")
  k = min(k, n)
  found = knn.top_k(queries["embeddings"], collection["embeddings"], k, **top_k_kwargs)
  records = []
  for q in range(len(queries["embeddings"])):
    neighbours = [{"rank": r + 1, "index": int(i),
                   "similarity": float(found.similarities[q, r]),
                   "path": str(collection["paths"][i]), "label": _label(collection, i)}
                  for r, i in enumerate(found.indices[q])]
    records.append({"path": str(queries["paths"][q]), "label": _label(queries, q),
                    "neighbours": neighbours})
  return records


def format_table(records: list[dict]) -> str:
  """The neighbours of every query as aligned text."""
  lines = []
  for q in records:
    label = "" if q["label"] is None else f"  (label {q['label']})"
    lines.append(f"query {q['path']}{label}")
    for n in q["neighbours"]:
      label = "" if n["label"] is None else f"  label {n['label']}"
      hit = "" if q["label"] is None or n["label"] is None else (
          "  ✓" if n["label"] == q["label"] else "  ✗")
      lines.append(f"  {n['rank']:>3}  {n['similarity']:.4f}  {n['path']}{label}{hit}")
  return "\n".join(lines)


def html_page(records: list[dict], collection: dict, queries: dict, title: str) -> str:
  """``search_html.render`` of ``records`` with the images the files point at."""
  pages = []
  for q_i, q in enumerate(records):
    neighbours = [dict(n, name=n["path"], path=_image_path(collection, n["index"]))
                  for n in q["neighbours"]]
    pages.append({"name": q["path"], "label": q["label"],
                  "path": _image_path(queries, q_i), "neighbours": neighbours})
  subtitle = (f"{len(records)} queries against {len(collection['embeddings']):,} items "
              f"({collection.get('backbone')}, {collection.get('embedding_dim')}-d, "
              f"{collection.get('workdir')} step {collection.get('step')})")
  return search_html.render(pages, title=title, subtitle=subtitle)


# ---------------------------------------------------------------------------- the command


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m msjax.search",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--embeddings", required=True, help="the collection: an msjax.embed file")
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--query", help="an image file, or a folder of images (any depth)")
  source.add_argument("--queries", help="query embeddings: another msjax.embed file")
  p.add_argument("--k", type=int, default=10, help="neighbours per query (default 10)")
  p.add_argument("--out", help="write the results as JSON here")
  p.add_argument("--html", help="write a self-contained HTML page of thumbnails here")
  p.add_argument("--overwrite", action="store_true", help="replace existing --out/--html")
  return p


def _run(args) -> int:
  for flag, path in (("--out", args.out), ("--html", args.html)):
    if path and os.path.exists(path) and not args.overwrite:
      raise SearchError(f"{flag} {path} exists; pass --overwrite to replace it.")
  if args.k < 1:
    raise SearchError(f"--k {args.k} must be at least 1.")
  collection = load_collection(args.embeddings)
  if args.queries is not None:
    queries = load_collection(args.queries)
    check_same_model(collection, queries, (args.embeddings, args.queries))
  else:
    queries = embed_queries(collection, args.query)
  records = search(collection, queries, args.k)
  print(format_table(records))
  if args.out:
    payload = {"collection": os.path.abspath(args.embeddings), "k": min(args.k, len(
        collection["embeddings"])), "model": {key: collection.get(key) for key in (
            "workdir", "step", "backbone", "embedding_dim")}, "queries": records}
    evaluate.write_json(args.out, payload)
  if args.html:
    evaluate.write_text(args.html, html_page(records, collection, queries,
                                     title=f"msjax search: {os.path.basename(args.embeddings)}"))
  written = [p for p in (args.out, args.html) if p]
  print(f"{len(records)} queries, {len(records[0]['neighbours'])} neighbours each"
        + (f"; wrote {', '.join(written)}" if written else ""), file=sys.stderr)
  return 0


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  try:
    return _run(args)
  except (SearchError, embed.EmbedError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except Exception as e:  # noqa: BLE001 - a user's mistake as one line, not a traceback
    if not embed.is_input_error(e):
      raise
    print(f"error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
