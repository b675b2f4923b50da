"""python -m msjax.embed: the evaluation's embeddings, on 1 and 8 devices, of a split or a
folder tree with unreadable files; bad input exits 1 with one line and writes nothing."""

import io
import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import data_fixtures as fx
from msjax import analysis
from msjax import data as data_lib
from msjax import embed, evaluate, train
from msjax.data import folder, pipeline
from test_train import _config, _tiny

REPO = pathlib.Path(__file__).resolve().parents[1]
BATCH = 24  # eval batch of the run: 32 test images = a full batch and a padded one


def _run_config():
  c = _tiny(_config())
  c.data.eval_batch_size = BATCH  # a multiple of 8: the run also loads on 8 devices
  c.data.resize_to = 18  # the eval transform resizes, then center-crops 16 px
  c.train.telemetry = False
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 6-step synthetic run, and the test embeddings its own final evaluation computed
  (``train.evaluate_model`` on the state that the last checkpoint, step 6, holds)."""
  workdir = tmp_path_factory.mktemp("embed") / "run"
  seen = []
  real_embed = evaluate.embed

  def spy(embed_fn, batches):
    seen.append(real_embed(embed_fn, batches))
    return seen[-1]

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(evaluate, "embed", spy)
    final = train.train_and_evaluate(_run_config(), str(workdir))
  assert final["step"] == 6 and len(seen) == 1  # eval_every=0: only the final one
  return workdir, seen[-1]


# The readable images of _image_tree, sorted by path components: a folder's subtree
# stays together, before "a-b.bmp".
READABLE = ["a/deep/y.webp", "a/x.JPG", "a-b.bmp", "b.png", "c/z.tiff"]


def _image_tree(root: pathlib.Path) -> None:
  """Images in several formats at depths 0-2, two unreadable files with image
  extensions, and files that are not images."""
  for i, rel in enumerate(["b.png", "a/x.JPG", "a/deep/y.webp", "a-b.bmp", "c/z.tiff"]):
    fx.write_image(str(root / rel), i + 1)
  jpeg = io.BytesIO()
  Image.fromarray(fx.image_array(7)).save(jpeg, "JPEG")
  (root / "a" / "cut.jpg").write_bytes(jpeg.getvalue()[:60])  # a truncated JPEG
  (root / "c" / "notes.png").write_text("a text file, named .png")
  (root / "c" / "readme.txt").write_text("not an image extension: ignored")
  fx.write_image(str(root / ".hidden" / "h.png"), 9)  # hidden folder: not listed


def _start(*args, devices: int = 1) -> subprocess.Popen:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env["JAX_PLATFORMS"] = "cpu"
  if devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return subprocess.Popen([sys.executable, "-m", "msjax.embed", *map(str, args)],
                          cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


# Bad input: (arguments, the message its one line must hold). The first five run as
# commands, with the happy paths; the rest through embed.main in this process.
BAD_INPUTS = {
    "missing_workdir": (["--workdir", "{tmp}/nope", "--split", "test"],
                        "nope does not exist"),
    "no_checkpoint": (["--workdir", "{tmp}/untrained", "--split", "test"],
                      "has no checkpoint yet: train first"),
    "empty_folder": (["--images", "{tmp}/empty"], "holds no image files"),
    "no_such_split": (["--split", "query"], "has no split 'query'; it has train, test."),
    "existing_out": (["--split", "test"], "exists; pass --overwrite to replace it"),
    "no_saved_step": (["--workdir", "{tmp}/no_steps", "--split", "test"],
                      "has no checkpoint yet: train first"),
    "no_val_split": (["--split", "val"],
                     "exists only in runs trained with config.data.val_fraction"),
    "unsaved_step": (["--split", "test", "--step", "3"],
                     "has no such checkpoint; the saved steps are [6]"),
}
IN_SUBPROCESS = ("missing_workdir", "no_checkpoint", "empty_folder", "no_such_split",
                 "existing_out")


def _inputs(tmp: pathlib.Path, workdir: pathlib.Path) -> None:
  """The folders the commands read: an image tree, a folder without images, and
  workdirs without a checkpoint."""
  _image_tree(tmp / "images")
  (tmp / "empty" / "sub").mkdir(parents=True)
  (tmp / "empty" / "sub" / "a.txt").write_text("no images here")
  fx.write_image(str(tmp / "empty" / ".hidden.png"), 1)
  for name, checkpoints in (("untrained", False), ("no_steps", True)):
    (tmp / name / ("checkpoints" if checkpoints else "")).mkdir(parents=True)
    (tmp / name / "config.json").write_text((workdir / "config.json").read_text())


def _args(name, args, tmp, workdir) -> tuple[list[str], pathlib.Path]:
  """A command's arguments, writing to a folder of its own (made here, and empty unless
  the case is an existing --out)."""
  out_dir = tmp / "out" / name
  out_dir.mkdir(parents=True)
  if name == "existing_out":
    (out_dir / "e.npz").write_bytes(b"keep me")
  args = [str(a).format(tmp=tmp) for a in args]
  if "--workdir" not in args:
    args = ["--workdir", str(workdir), *args]
  return [*args, "--out", str(out_dir / "e.npz")], out_dir


@pytest.fixture(scope="module")
def cli(trained, tmp_path_factory):
  """The commands, run at once (each is mostly JAX start-up and compilation):
  name -> ``(returncode, stdout, stderr, out dir)``."""
  workdir, _ = trained
  tmp = tmp_path_factory.mktemp("cli")
  _inputs(tmp, workdir)
  commands = {"test": (["--split", "test"], 1), "eight": (["--split", "test"], 8),
              "images": (["--images", "{tmp}/images"], 1)}
  commands.update({name: (BAD_INPUTS[name][0], 1) for name in IN_SUBPROCESS})
  procs = {}
  for name, (args, devices) in commands.items():
    args, out_dir = _args(name, args, tmp, workdir)
    procs[name] = (_start(*args, devices=devices), out_dir)
  results = {}
  for name, (proc, out_dir) in procs.items():
    stdout, stderr = proc.communicate(timeout=300)
    results[name] = (proc.returncode, stdout, stderr, out_dir)
  return results


def _happy(cli, name):
  rc, stdout, stderr, out_dir = cli[name]
  assert rc == 0, stderr[-3000:]
  return embed.load(out_dir / "e.npz"), stdout, stderr


def test_split_test_is_the_evaluations_embeddings_bit_for_bit(trained, cli):
  workdir, (emb, labels) = trained
  z, stdout, stderr = _happy(cli, "test")
  np.testing.assert_array_equal(z["embeddings"], emb)  # bit for bit, in order
  np.testing.assert_array_equal(z["labels"], labels)
  assert z["embeddings"].dtype == np.float32 and z["labels"].dtype == np.int32
  run = analysis.load_run(workdir)
  split = run.dataset.test
  assert list(z["paths"]) == [split.images.describe(i) for i in range(len(split))]
  np.testing.assert_array_equal(z["labels"], split.labels)
  assert z["skipped"].shape == (0,) and z["root"] == ""  # synthetic: no files
  assert (z["format"], z["split"], z["images_dir"]) == (embed.FORMAT, "test", "")
  assert (z["workdir"], z["step"]) == (str(workdir), 6)
  assert (z["backbone"], z["embedding_dim"]) == ("small_cnn", 16)
  assert (z["batch_size"], z["num_devices"]) == (BATCH, 1)
  assert json.loads(z["config"]) == json.loads((workdir / "config.json").read_text())
  assert stdout.strip().splitlines()[-1] == f"embedded 32 images, skipped 0; wrote " \
      f"{cli['test'][3] / 'e.npz'}"
  assert "step 2/2  images 32/32" in stderr  # the progress line (batches)
  assert np.allclose(np.linalg.norm(z["embeddings"], axis=1), 1, atol=1e-5)


def test_eight_devices_equal_one(trained, cli):
  """8 devices × 3 images is 1 device × 3 images bit for bit (each device runs the same
  program on the same images); against 1 device × 24 it differs in the last bit or so,
  because XLA's CPU convolutions group a batch of 24 differently from one of 3."""
  workdir, (emb_one_device, _) = trained
  z, _, _ = _happy(cli, "eight")
  assert (z["num_devices"], z["batch_size"]) == (8, BATCH)
  run = analysis.load_run(workdir)
  three_a_batch = embed.embed_split(run, run.dataset.test, batch_size=BATCH // 8,
                                    progress=False)
  np.testing.assert_array_equal(z["embeddings"], three_a_batch.embeddings)
  np.testing.assert_allclose(z["embeddings"], emb_one_device, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(z["labels"], run.dataset.test.labels)
  assert list(z["paths"]) == three_a_batch.paths


def test_images_folder_tree_with_unreadable_files(trained, cli):
  workdir, _ = trained
  z, stdout, stderr = _happy(cli, "images")
  root = pathlib.Path(str(z["images_dir"]))
  assert folder.find_images(str(root)) == [
      "a/cut.jpg", "a/deep/y.webp", "a/x.JPG", "a-b.bmp", "b.png", "c/notes.png",
      "c/z.tiff"]
  assert list(z["paths"]) == READABLE and z["root"] == str(root) and z["split"] == ""
  assert list(z["skipped"]) == ["a/cut.jpg", "c/notes.png"]
  assert "truncated" in z["skipped_reasons"][0].lower()
  assert z["skipped_reasons"][1] == "not an image format PIL can read"
  for path, reason in zip(z["skipped"], z["skipped_reasons"]):
    assert f"skipped {path}: {reason}" in stderr.splitlines()
  assert stdout.strip().splitlines()[-1].startswith(
      "embedded 5 images, skipped 2 (listed above); wrote ")
  np.testing.assert_array_equal(z["labels"], np.full(5, -1))
  # The same files through the run's eval transform and model, here: one batch,
  # padded to the command's batch size. The command's batch held the two skipped files
  # as blanks (at 0 and 5), which moves no image's embedding by a bit.
  run = analysis.load_run(workdir, load_data=False)
  assert run.dataset is None
  transform = data_lib.image_transform(run.config.data, train=False)
  images = np.zeros((BATCH, 16, 16, 3), np.uint8)
  for i, rel in enumerate(READABLE):
    images[i] = transform((root / rel).read_bytes(), rel)
  want = train.make_embed_fn(run.model, run.mesh)(run.state, jnp.asarray(images))
  np.testing.assert_array_equal(z["embeddings"], np.asarray(want)[:len(READABLE)])


def _assert_refused(name, rc, stdout, stderr, out_dir):
  assert rc == 1, stderr[-3000:]
  lines = stderr.strip().splitlines()
  message = BAD_INPUTS[name][1]
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr
  assert stdout == ""
  files = sorted(p.name for p in out_dir.iterdir())
  if name == "existing_out":
    assert files == ["e.npz"] and (out_dir / "e.npz").read_bytes() == b"keep me"
  else:
    assert files == []


@pytest.mark.parametrize("name", IN_SUBPROCESS)
def test_bad_input_exits_1_with_one_line_and_writes_nothing(cli, name):
  _assert_refused(name, *cli[name])


@pytest.mark.parametrize("name", sorted(set(BAD_INPUTS) - set(IN_SUBPROCESS)))
def test_more_bad_input_in_process(trained, tmp_path, capsys, name):
  workdir, _ = trained
  _inputs(tmp_path, workdir)
  args, out_dir = _args(name, BAD_INPUTS[name][0], tmp_path, workdir)
  rc = embed.main(args)
  _assert_refused(name, rc, *capsys.readouterr(), out_dir)


def test_best_step_in_process(trained, tmp_path, capsys):
  """``--best`` picks the checkpoint with the best final metric (the only one here);
  ``--overwrite`` replaces a file."""
  workdir, (emb, _) = trained
  out = tmp_path / "best.npz"
  out.write_bytes(b"old")
  args = ["--workdir", str(workdir), "--split", "test", "--best", "--out", str(out)]
  assert embed.main(args) == 1
  assert out.read_bytes() == b"old"
  assert embed.main(args + ["--overwrite"]) == 0
  z = embed.load(out)
  assert z["step"] == 6
  np.testing.assert_array_equal(z["embeddings"], emb)
  assert capsys.readouterr().out.strip().endswith(f"wrote {out}")


def test_no_readable_image_is_an_error_listing_each(trained, tmp_path, capsys):
  workdir, _ = trained
  (tmp_path / "in").mkdir()
  (tmp_path / "in" / "a.jpg").write_bytes(b"not a jpeg")
  out = tmp_path / "out" / "e.npz"
  args = ["--workdir", str(workdir), "--images", str(tmp_path / "in"), "--out", str(out)]
  assert embed.main(args + ["--data-root", "x"]) == 1
  assert "--images reads no dataset" in capsys.readouterr().err
  assert embed.main(args) == 1
  err = capsys.readouterr().err.splitlines()
  assert "skipped a.jpg: not an image format PIL can read" in err
  assert err[-1].startswith("error: none of the 1 images could be embedded")
  assert not (tmp_path / "out").exists()


def test_find_images_sorts_by_path_components(tmp_path):
  for rel in ["b.PNG", "a-b.jpg", "a/z.gif", "a/b/c.jpeg", "a.b/d.tif", ".git/x.png",
              "a/.x.png", "a/n.txt"]:
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_bytes(b"")
  assert folder.find_images(str(tmp_path)) == [
      "a/b/c.jpeg", "a/z.gif", "a-b.jpg", "a.b/d.tif", "b.PNG"]


def test_skip_unreadable_masks_and_keeps_the_index(tmp_path):
  fixture = fx.make_folder(str(tmp_path), num_classes=2, sizes=6, depth=1, extras=False)
  bad = fixture.paths("train")[1]
  with open(bad, "wb") as f:
    f.write(b"garbage")
  split = folder.load_folder(fixture.root).train
  transform = data_lib.ImageTransform(image_size=8, resize_to=10, train=False)
  with pytest.raises(data_lib.ImageReadError, match="cannot decode"):
    list(pipeline.eval_dataset(split, transform, batch_size=4))
  (b0, b1) = list(pipeline.eval_dataset(split, transform, batch_size=4,
                                        skip_unreadable=True))
  assert b0["mask"].tolist() == [True, False, True, True]
  assert b0["index"].tolist() == [0, 1, 2, 3] and b0["label"][1] == -1
  assert not b0["image"][1].any()
  assert b1["mask"].tolist() == [True, True, False, False]
  assert b1["index"].tolist() == [4, 5, -1, -1]
  assert pipeline.unreadable_reason(split, transform, 1) == \
      "not an image format PIL can read"
  assert pipeline.unreadable_reason(split, transform, 0) is None
  os.remove(bad)
  assert pipeline.unreadable_reason(split, transform, 1).startswith(
      "cannot read the file: No such file")


def test_save_is_atomic_and_keeps_existing_files(tmp_path, monkeypatch):
  result = embed.Embeddings(np.ones((2, 3), np.float32), np.array([0, 1]), ["a", "b"],
                            [("c", "why")], "/r")
  out = tmp_path / "sub" / "e.npz"
  assert embed.save(out, result, {"step": 3, "split": "test"}) == str(out)
  z = embed.load(out)
  assert z["skipped"].tolist() == ["c"] and z["skipped_reasons"].tolist() == ["why"]
  assert (z["step"], z["split"], z["root"]) == (3, "test", "/r")
  with pytest.raises(embed.EmbedError, match="exists; pass --overwrite"):
    embed.save(out, result, {})
  # A failure while writing leaves the old file as it was, and no temporary file.
  monkeypatch.setattr(type(embed.epath.Path(out)), "replace", lambda *a: 1 / 0)
  with pytest.raises(ZeroDivisionError):
    embed.save(out, result, {"step": 4}, overwrite=True)
  assert embed.load(out)["step"] == 3
  assert sorted(p.name for p in out.parent.iterdir()) == ["e.npz"]
