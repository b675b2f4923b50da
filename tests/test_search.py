"""msjax.search: neighbours against a float64 brute-force stable sort, the HTML page's
structure, and every bad input as one line and exit status 1."""

import html.parser
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from msjax import config as config_lib
from msjax import embed, search_html, train

REPO = pathlib.Path(__file__).parents[1]


def brute_force(q, g, k):
  """Each query's k best rows of ``g`` by float64 inner product, ties to the lower row."""
  s = np.asarray(q, np.float64) @ np.asarray(g, np.float64).T
  order = np.stack([np.lexsort((np.arange(len(g)), -row))[:k] for row in s])
  return order, np.take_along_axis(s, order, axis=1)


def cli(*args, check_rc=0):
  out = subprocess.run([sys.executable, "-m", "msjax.search", *map(str, args)],
                       capture_output=True, text=True, timeout=600, cwd=REPO,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == check_rc, out.stderr[-3000:]
  return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 4-step synthetic run, a folder of images (duplicates included) and its
  embeddings file."""
  root = tmp_path_factory.mktemp("search")
  c = config_lib.load_config_file(REPO / "configs" / "synthetic.py")
  c.data.synthetic.update(num_train_classes=16, num_test_classes=8, images_per_class=4,
                          image_size=16)
  c.data.update(image_size=16, classes_per_batch=8, images_per_class=2, eval_batch_size=32)
  c.model.embedding_dim = 16
  c.train.update(num_steps=4, log_every=2, checkpoint_every=0, eval_untrained=False)
  train.train_and_evaluate(c, str(root / "run"))
  images = root / "images"
  rng = np.random.default_rng(0)
  for i in range(14):
    sub = images / f"part{i % 3}" / ("deep" if i % 2 else "")
    sub.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, (20 + i, 18, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(sub / f"img{i:02d}.png")
  # Exact duplicates: the same pixels under two names.
  (images / "part0" / "dup_a.png").write_bytes((images / "part0" / "img00.png").read_bytes())
  (images / "part1" / "dup_b.png").write_bytes((images / "part0" / "img00.png").read_bytes())
  (images / "part2" / "broken.jpg").write_bytes(b"not a jpeg")
  out = subprocess.run([sys.executable, "-m", "msjax.embed", "--workdir", root / "run",
                        "--images", images, "--out", root / "images.npz"],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
  assert out.returncode == 0, out.stderr[-3000:]
  return root


def test_search_equals_brute_force_with_ties_and_duplicates(run, tmp_path):
  collection = embed.load(run / "images.npz")
  g = collection["embeddings"]
  assert len(g) == 16 and list(collection["skipped"]) == ["part2/broken.jpg"]
  # Every item searches the collection: itself first, its duplicates tied after it.
  cli("--embeddings", run / "images.npz", "--queries", run / "images.npz", "--k", 16,
      "--out", tmp_path / "all.json")
  result = json.loads((tmp_path / "all.json").read_text())
  want_i, want_s = brute_force(g, g, 16)
  got_i = np.array([[n["index"] for n in q["neighbours"]] for q in result["queries"]])
  got_s = np.array([[n["similarity"] for n in q["neighbours"]] for q in result["queries"]])
  np.testing.assert_array_equal(got_i, want_i)
  np.testing.assert_allclose(got_s, want_s, atol=2e-6)
  paths = list(collection["paths"])
  dups = sorted(paths.index(p) for p in ("part0/dup_a.png", "part1/dup_b.png",
                                         "part0/img00.png"))
  assert np.array_equal(g[dups[0]], g[dups[1]]) and np.array_equal(g[dups[0]], g[dups[2]])
  for d in dups:  # three identical vectors: tied, in index order, for each of them
    assert got_i[d, :3].tolist() == dups
  assert [q["path"] for q in result["queries"]] == paths
  assert all(q["label"] is None for q in result["queries"])


def test_query_image_is_embedded_with_the_collections_model(run, tmp_path):
  query = run / "images" / "part1" / "deep" / "img01.png"
  out = cli("--embeddings", run / "images.npz", "--query", query, "--k", 3,
            "--out", tmp_path / "one.json", "--html", tmp_path / "one.html")
  result = json.loads((tmp_path / "one.json").read_text())
  (q,) = result["queries"]
  assert q["path"] == "img01.png" and q["neighbours"][0]["path"] == "part1/deep/img01.png"
  assert q["neighbours"][0]["similarity"] == pytest.approx(1.0, abs=1e-5)
  assert "part1/deep/img01.png" in out.stdout  # the table
  page = PageParser.parse((tmp_path / "one.html").read_text())
  assert len(page.queries) == 1 and len(page.queries[0]["neighbours"]) == 3
  assert all(n["class"] == "unknown" for n in page.queries[0]["neighbours"])
  assert page.images == 4 and page.missing == 0  # the query and its 3 neighbours, inlined


class PageParser(html.parser.HTMLParser):
  """The structure of a search page: queries, their neighbours' attributes, images."""

  def __init__(self):
    super().__init__()
    self.queries, self.images, self.missing = [], 0, 0

  @classmethod
  def parse(cls, text):
    p = cls()
    p.feed(text)
    return p

  def handle_starttag(self, tag, attrs):
    a = dict(attrs)
    if tag == "section" and a.get("class") == "query":
      self.queries.append({"label": a["data-label"], "neighbours": []})
    elif tag == "li":
      self.queries[-1]["neighbours"].append(
          {"class": a["class"], "index": int(a["data-index"]), "label": a["data-label"],
           "similarity": float(a["data-similarity"])})
    elif tag == "img":
      assert a["src"].startswith("data:image/jpeg;base64,")
      self.images += 1
    elif tag == "div" and a.get("class") == "missing":
      self.missing += 1


def test_html_frames_hits_green_and_misses_red(tmp_path):
  image = tmp_path / "a.png"
  Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(image)
  records = [{"name": "q0", "path": str(image), "label": 3, "neighbours": [
      {"index": 5, "name": "n5", "path": str(image), "label": 3, "similarity": 0.9},
      {"index": 2, "name": "n2", "path": str(tmp_path / "gone.png"), "label": 1,
       "similarity": 0.5},
      {"index": 7, "name": "n7", "path": None, "label": None, "similarity": 0.25}]},
      {"name": "q1 <&>", "path": None, "label": None, "neighbours": [
          {"index": 0, "name": "n0", "path": str(image), "label": 4, "similarity": 0.1}]}]
  text = search_html.render(records, title="t")
  page = PageParser.parse(text)
  assert [q["label"] for q in page.queries] == ["3", "None"]
  assert [(n["class"], n["index"], n["label"]) for n in page.queries[0]["neighbours"]] == [
      ("hit", 5, "3"), ("miss", 2, "1"), ("unknown", 7, "None")]
  assert page.queries[1]["neighbours"][0]["class"] == "unknown"  # query label unknown
  assert page.images == 3 and page.missing == 3  # unreadable and file-less shown as boxes
  assert "q1 &lt;&amp;&gt;" in text and ".hit { border-color: #1a9c3a; }" in text


@pytest.mark.parametrize("case", ["missing", "not_npz", "other_dim", "empty_dir", "text",
                                  "exists"])
def test_bad_input_is_one_line_and_writes_nothing(run, tmp_path, case):
  args = ["--embeddings", run / "images.npz", "--k", 3, "--out", tmp_path / "r.json"]
  if case == "missing":
    args[1] = tmp_path / "nope.npz"
    args += ["--queries", run / "images.npz"]
    message = "no such file"
  elif case == "not_npz":
    (tmp_path / "x.npz").write_text("hello")
    args[1] = tmp_path / "x.npz"
    args += ["--queries", run / "images.npz"]
    message = "is not an msjax.embed file"
  elif case == "other_dim":
    data = embed.load(run / "images.npz")
    result = embed.Embeddings(np.ones((2, 5), np.float32), np.full(2, -1), ["a", "b"], [], "")
    embed.save(tmp_path / "other.npz", result, {k: data[k] for k in ("format", "workdir",
                                                                     "step")})
    args += ["--queries", tmp_path / "other.npz"]
    message = "5-d embeddings but .* holds 16-d"
  elif case == "empty_dir":
    (tmp_path / "empty").mkdir()
    args += ["--query", tmp_path / "empty"]
    message = "holds no image files"
  elif case == "text":
    (tmp_path / "notes.txt").write_text("hi")
    args += ["--query", tmp_path / "notes.txt"]
    message = "is not an image file"
  else:
    (tmp_path / "r.json").write_text("keep me")
    args += ["--queries", run / "images.npz"]
    message = "exists; pass --overwrite"
  out = cli(*args, check_rc=1)
  err = out.stderr.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), out.stderr

  assert re.search(message, err[0]), err[0]
  expected = ["r.json"] if case == "exists" else []
  assert sorted(p.name for p in tmp_path.iterdir()
                if p.suffix in (".json", ".html")) == expected
  if case == "exists":
    assert (tmp_path / "r.json").read_text() == "keep me"
