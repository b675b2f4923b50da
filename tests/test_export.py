"""python -m msjax.export: the serialized embedder runs without msjax and embeds exactly
as evaluation does; bad input is refused with one line and nothing written."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from msjax import analysis, export, train
from test_train import _config, _tiny

REPO = pathlib.Path(__file__).parents[1]
PLATFORMS = ["cpu", "cuda", "tpu"]  # lowered for all three here; the tests run on cpu


def _env():
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env.pop("PYTHONPATH", None)
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _images(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)


def _reference(workdir, step=None):
  """``images -> embeddings`` as the in-process evaluation computes them."""
  run = analysis.load_run(workdir, step=step)
  embed = train.make_embed_fn(run.model, run.mesh)
  return lambda images: np.asarray(jax.device_get(embed(run.state, images)))


def _tree(root):
  """Every path under ``root`` with its size: what "nothing written" compares."""
  return {str(p.relative_to(root)): p.stat().st_size if p.is_file() else None
          for p in sorted(pathlib.Path(root).rglob("*"))}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 6-step synthetic run with checkpoints at steps 3 and 6, exported (the latest) by
  the command line for cpu, cuda and tpu."""
  root = tmp_path_factory.mktemp("export")
  c = _tiny(_config())
  c.train.checkpoint_every = 3
  c.train.telemetry = False
  train.train_and_evaluate(c, str(root / "run"))
  out = subprocess.run(
      [sys.executable, "-m", "msjax.export", "--workdir", str(root / "run"), "--out",
       str(root / "exported"), "--platforms", ",".join(PLATFORMS)],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Exported step 6 (latest)" in out.stdout
  return root


ISOLATED = textwrap.dedent("""\
    import json, runpy, sys
    import numpy as np

    class NoMsjax:  # the loader must not even try to import msjax
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "msjax":
          raise ImportError("msjax is not available to this process")
    sys.meta_path.insert(0, NoMsjax())

    directory, inputs = sys.argv[1], sys.argv[2:]
    loader = runpy.run_path(directory + "/load_embedder.py")
    embed = loader["load"](directory)
    for path in inputs:
      np.save(path + ".out.npy", embed(np.load(path)))
    imported = any(m.split(".")[0] == "msjax" for m in sys.modules)
    print(json.dumps({"msjax_imported": imported,
                      "platforms": list(embed.exported.platforms),
                      "image_shape": list(embed.image_shape)}))
    """)


def test_the_export_runs_without_msjax_and_embeds_as_evaluation_does(run, tmp_path):
  sizes = (1, 3, 8, 0)
  inputs = []
  for n in sizes:
    inputs.append(str(tmp_path / f"images_{n}.npy"))
    np.save(inputs[-1], _images(n, seed=n))
  script = tmp_path / "isolated.py"
  script.write_text(ISOLATED)
  # -I: no PYTHONPATH, no user site, neither the script's nor the current directory on
  # sys.path.
  out = subprocess.run(
      [sys.executable, "-I", str(script), str(run / "exported"), *inputs], cwd=tmp_path,
      env=_env(), capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  info = json.loads(out.stdout.strip().splitlines()[-1])
  assert info == {"msjax_imported": False, "platforms": PLATFORMS,
                  "image_shape": [16, 16, 3]}
  reference = _reference(run / "run")
  for n, path in zip(sizes, inputs):
    emb = np.load(path + ".out.npy")
    assert emb.dtype == np.float32 and emb.shape == (n, 16)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    if n:
      np.testing.assert_allclose(emb, reference(np.load(path)), rtol=0, atol=1e-6)


def test_the_copied_loader_is_a_command_too(run, tmp_path):
  np.save(tmp_path / "images.npy", _images(5))
  out = subprocess.run(
      [sys.executable, "-I", str(run / "exported" / "load_embedder.py"), "--images",
       str(tmp_path / "images.npy"), "--out", str(tmp_path / "emb.npy")],
      cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "5 images -> float32 embeddings [5, 16]" in out.stdout
  emb = np.load(tmp_path / "emb.npy")
  np.testing.assert_allclose(emb, export.load(run / "exported")(_images(5)), atol=1e-6)


def test_the_directory_and_its_manifest(run):
  out = run / "exported"
  assert sorted(os.listdir(out)) == ["embedder.jax", "load_embedder.py", "manifest.json",
                                     "params.npz"]
  assert not [p for p in os.listdir(run) if p.startswith(".")]  # no temporary left
  m = json.loads((out / "manifest.json").read_text())
  assert m["input"]["shape"] == [None, 16, 16, 3] and m["input"]["dtype"] == "uint8"
  assert m["output"]["shape"] == [None, 16] and m["output"]["dtype"] == "float32"
  assert m["platforms"] == PLATFORMS
  assert m["checkpoint"]["step"] == 6 and m["checkpoint"]["selected_by"] == "latest"
  assert m["workdir"] == str(run / "run")
  assert m["model"]["backbone"] == "small_cnn" and m["model"]["embedding_dim"] == 16
  assert m["jax_version"] == jax.__version__
  # One implementation of the loader: the copy is msjax's own file.
  assert (out / "load_embedder.py").read_bytes() == \
      (REPO / "msjax" / "load_embedder.py").read_bytes()
  with np.load(out / "params.npz") as z:
    assert m["model"]["num_parameters"] == sum(z[k].size for k in z.files)
    assert {k.split(".")[0] for k in z.files} == {"params", "rest"}
  # The weights are an argument, not constants in the module.
  sizes = [(out / f).stat().st_size for f in ("embedder.jax", "params.npz")]
  assert sizes[0] < 100_000 < sizes[1]


def test_a_chosen_step_and_the_best_one(run, tmp_path):
  info = export.export_embedder(run / "run", tmp_path / "step3", step=3,
                                platforms=["cpu"])
  assert (info["checkpoint"]["step"], info["platforms"]) == (3, ["cpu"])
  images = _images(4, seed=7)
  at3 = export.load(tmp_path / "step3")(images)
  np.testing.assert_allclose(at3, _reference(run / "run", step=3)(images), atol=1e-6)
  assert np.abs(at3 - export.load(run / "exported")(images)).max() > 1e-3
  # Only the final checkpoint was saved with an evaluation, so it is the best.
  info = export.export_embedder(run / "run", tmp_path / "best", best=True,
                                platforms=["cpu"])
  assert info["checkpoint"]["selected_by"] == "best test/recall@1"
  assert info["checkpoint"]["step"] == 6
  assert info["checkpoint"]["metrics"]["test/recall@1"] >= 0


def test_loading_rejects_images_of_the_wrong_size_or_type(run):
  embed = export.load(run / "exported")
  with pytest.raises(ValueError,
                     match=r"uint8 images of shape \[N, 16, 16, 3\].*float32"):
    embed(_images(2).astype(np.float32))
  with pytest.raises(ValueError, match=r"got uint8 \[2, 32, 32, 3\]"):
    embed(np.zeros((2, 32, 32, 3), np.uint8))
  with pytest.raises(FileNotFoundError, match="not a directory written by python -m "
                     "msjax.export"):
    export.load(run / "run")


def test_overwrite_replaces_an_earlier_export_and_a_failed_write_leaves_it(run, tmp_path,
                                                                           monkeypatch):
  out = tmp_path / "out"
  export.export_embedder(run / "run", out, step=3, platforms=["cpu"])
  before = _tree(tmp_path)

  def broken_savez(*args, **kwargs):
    raise OSError("disk full")
  monkeypatch.setattr(np, "savez", broken_savez)
  with pytest.raises(export.ExportError, match="disk full.*an earlier export there is "
                     "unchanged"):
    export.export_embedder(run / "run", out, platforms=["cpu"], overwrite=True)
  with pytest.raises(export.ExportError, match="could not write .*new .*disk full"):
    export.export_embedder(run / "run", tmp_path / "new", platforms=["cpu"])
  assert _tree(tmp_path) == before  # no temporary, no new directory, the old export whole
  monkeypatch.undo()

  info = export.export_embedder(run / "run", out, platforms=["cpu"], overwrite=True)
  assert info["checkpoint"]["step"] == 6
  assert json.loads((out / "manifest.json").read_text())["checkpoint"]["step"] == 6
  assert sorted(os.listdir(tmp_path)) == ["out"]


# case -> (--workdir, --out, other arguments, message); None: the run, a new directory.
BAD_INPUT = {
    "missing workdir": ("nowhere", None, [], "nowhere does not exist"),
    "no checkpoint": ("untrained", None, [],
                      "untrained has no checkpoint yet: train first"),
    "non-empty out": (None, "taken", [], "taken exists and is not empty"),
    "overwrite what is not an export": (None, "taken", ["--overwrite"],
                                        "is not an earlier export"),
    "unknown platform": (None, None, ["--platforms", "cpu,gpu"],
                         "gpu is not a platform jax.export lowers for"),
    "unsaved step": (None, None, ["--step", "4"], "the saved steps are [3, 6]"),
    "best of a run without metrics": ("unranked", None, ["--best"],
                                      "was saved with the metric test/recall@1"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_exits_1_with_one_line_and_writes_nothing(case, run, tmp_path, capsys):
  config = (run / "run" / "config.json").read_text()
  (tmp_path / "untrained").mkdir()  # a workdir that never saved a checkpoint
  (tmp_path / "untrained" / "config.json").write_text(config)
  (tmp_path / "taken").mkdir()
  (tmp_path / "taken" / "notes.txt").write_text("mine")
  # A copy of the run holding only step 3, which was saved before any evaluation.
  (tmp_path / "unranked").mkdir()
  (tmp_path / "unranked" / "config.json").write_text(config)
  shutil.copytree(run / "run" / "checkpoints" / "3",
                  tmp_path / "unranked" / "checkpoints" / "3")
  workdir, out, extra, message = BAD_INPUT[case]
  argv = ["--workdir", str(tmp_path / workdir if workdir else run / "run"),
          "--out", str(tmp_path / (out or "out")), *extra]
  before, run_before = _tree(tmp_path), _tree(run)
  assert export.main(argv) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  assert message in err
  assert _tree(tmp_path) == before and _tree(run) == run_before


def test_the_command_fails_without_a_traceback(tmp_path):
  out = subprocess.run([sys.executable, "-m", "msjax.export", "--workdir",
                        str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300,
                       check=False)
  assert out.returncode == 1
  assert out.stderr.strip().splitlines() == [
      f"error: --workdir {tmp_path / 'nowhere'} does not exist (or is not a directory); "
      "pass the --workdir a training run used."]
  assert os.listdir(tmp_path) == []
