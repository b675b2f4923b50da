"""The sharded global-batch loss on 8 virtual CPU devices equals the single-device loss."""

import pytest

import msjax.losses as L
from scripts_run import run_json_script


@pytest.fixture(scope="module")
def report():
  return run_json_script("global_batch_check.py")


def test_runs_on_eight_devices(report):
  assert report["devices"] == 8
  assert len(report["results"]) == len(L.NAMES) * 2 * 2


def test_sharded_value_and_gradient_equal_single_device(report):
  for r in report["results"]:
    assert r["value"] == pytest.approx(r["ref_value"], rel=1e-12), r
    assert r["grad_err"] <= 1e-12 * r["grad_scale"], r
    assert r["grad_scale"] > 0, r
    assert r["grad_sharding"] == "P('batch', None)", r


def test_each_device_forms_only_its_rows_of_the_similarity_matrix(report):
  """Per-device matmuls are [B/n, B] (or row blocks of it), never the [B, B] matrix."""
  for r in report["results"]:
    assert "64x64" not in r["dot_shapes"], r
    expected_rows = "8x64" if r["block_size"] is None else "3x64"
    assert expected_rows in r["dot_shapes"], r
