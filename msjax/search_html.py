"""A self-contained HTML page of search results: each query beside its nearest neighbours.

Every image is a thumbnail inlined as a ``data:`` URI, so the one file opens anywhere (a
laptop, a notebook, an e-mail) without the images it was made from. Under each
neighbour: its rank, similarity and path. When labels are known, a neighbour with the
query's label is framed green (class ``hit``) and any other red (``miss``); without labels
the frame is grey (``unknown``). An image that cannot be read shows as a grey box with the
reason, so a page is still written for the rest.

The page is plain HTML and CSS (no script). Its structure is stable for tools and tests:
one ``<section class="query">`` per query with ``data-label``, holding a
``<figure class="query-image">`` and an ``<ol class="neighbours">`` of ``<li>`` with
``data-index``, ``data-label`` and ``data-similarity``.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Sequence


THUMBNAIL_SIZE = 160  # pixels, the longer side

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
section.query { display: flex; align-items: flex-start; gap: 1.2em; margin: 1em 0;
                padding-bottom: 1em; border-bottom: 1px solid #ddd; }
figure { margin: 0; width: %(size)dpx; font-size: 12px; overflow-wrap: anywhere; }
figure img, figure .missing { width: %(size)dpx; height: %(size)dpx; object-fit: contain;
                              background: #f4f4f4; display: block; }
figure .missing { display: flex; align-items: center; justify-content: center;
                  text-align: center; color: #888; }
ol.neighbours { display: flex; flex-wrap: wrap; gap: 0.6em; list-style: none;
                margin: 0; padding: 0; }
ol.neighbours li { border: 4px solid #bbb; padding: 2px; }
ol.neighbours li.hit { border-color: #1a9c3a; }
ol.neighbours li.miss { border-color: #d0312d; }
.query-image { border: 4px solid #333; padding: 2px; }
""" % {"size": THUMBNAIL_SIZE}


def thumbnail_uri(path: str, size: int = THUMBNAIL_SIZE) -> tuple[str | None, str | None]:
  """``(data URI of a JPEG thumbnail, None)``, or ``(None, reason)`` if unreadable."""
  from PIL import Image
  try:
    with Image.open(path) as image:
      image = image.convert("RGB")
      image.thumbnail((size, size))
      buffer = io.BytesIO()
      image.save(buffer, format="JPEG", quality=85)
  except Exception as e:  # noqa: BLE001 - any decoding failure is shown on the page
    return None, f"{type(e).__name__}: {e}"
  return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode(), None


def _figure(path: str | None, caption: str, css_class: str = "") -> str:
  uri, problem = thumbnail_uri(path) if path is not None else (None, "no image file")
  alt = html.escape(path or "", quote=True)
  if uri is None:
    picture = f'<div class="missing" title="{html.escape(problem, quote=True)}">unreadable</div>'
  else:
    picture = f'<img src="{uri}" alt="{alt}">'
  cls = f' class="{css_class}"' if css_class else ""
  return f"<figure{cls}>{picture}<figcaption>{caption}</figcaption></figure>"


def _label_text(label) -> str:
  return "" if label is None else f"label {html.escape(str(label))}"


def render(queries: Sequence[dict], *, title: str, subtitle: str = "") -> str:
  """The page for ``queries``, each a dict with ``path`` (an image file or None),
  ``name`` (shown under it), ``label`` (None when unknown) and ``neighbours``: dicts with
  ``index``, ``path``, ``name``, ``label`` and ``similarity``, best first."""
  parts = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
           f"<h1>{html.escape(title)}</h1>"]
  if subtitle:
    parts.append(f"<p>{html.escape(subtitle)}</p>")
  for q in queries:
    q_label = q.get("label")
    caption = "<br>".join(filter(None, [html.escape(q["name"]), _label_text(q_label)]))
    parts.append(f'<section class="query" data-label="{html.escape(str(q_label))}">')
    parts.append(_figure(q.get("path"), f"query<br>{caption}", "query-image"))
    parts.append('<ol class="neighbours">')
    for rank, n in enumerate(q["neighbours"], start=1):
      label = n.get("label")
      if q_label is None or label is None:
        kind = "unknown"
      else:
        kind = "hit" if label == q_label else "miss"
      caption = "<br>".join(filter(None, [
          f"{rank}. similarity {n['similarity']:.4f}", html.escape(n["name"]),
          _label_text(label)]))
      parts.append(f'<li class="{kind}" data-index="{int(n["index"])}" '
                   f'data-label="{html.escape(str(label))}" '
                   f'data-similarity="{float(n["similarity"]):.6f}">'
                   f"{_figure(n.get('path'), caption)}</li>")
    parts.append("</ol></section>")
  parts.append("</body></html>")
  return "\n".join(parts)
