"""The matmul benchmark times the step's shapes, and both backends compute the same products."""

import numpy as np

from adarank_jax.benchmarks import matmul


def test_shapes_are_one_blocks_products():
  table = matmul.shapes(width=4, tasks=3, tokens=5)
  assert len(table) == 20
  assert table["rebuild in_proj"] == (4, 12, 12)  # (m, T*r, n), r = min(4, 12)
  assert table["rebuild c_proj"] == (16, 12, 4)  # c_proj is (4w, w): r = w
  assert table["rebuild-grad c_fc"] == (12, 4, 16)
  assert table["tower out_proj"] == (5, 4, 4)
  assert table["tower-dx c_fc"] == (5, 16, 4)
  assert table["tower-dw c_proj"] == (16, 5, 4)


def test_both_backends_time_the_same_products(capsys):
  result = matmul.main(["--width", "8", "--tasks", "2", "--tokens", "3", "--repeats", "1"])
  rows = {row["name"]: row for row in result["rows"]}
  assert set(rows) == set(matmul.shapes(width=8, tasks=2, tokens=3))
  for row in rows.values():
    np.testing.assert_allclose(row["jax"]["checksum"], row["torch"]["checksum"], rtol=1e-4, atol=1e-4)
    assert row["jax"]["gflops"] > 0 and row["torch"]["gflops"] > 0
    np.testing.assert_allclose(row["ratio"], row["jax"]["gflops"] / row["torch"]["gflops"])
  out = capsys.readouterr().out
  assert "machine:" in out and "| rebuild in_proj | (8, 16, 24) |" in out
