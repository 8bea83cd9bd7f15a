"""results.json / markdown content, the rank heatmap and summary, and the metric writers."""

import json
import subprocess
import sys

import numpy as np
import pytest

from adarank_jax.core import evaluate
from adarank_jax.experiment import report

TASKS = ["MNIST", "DTD"]


def _results():
  results = report.new_results(
    name="vitb32_t8",
    tasks=TASKS,
    model="ViT-B-32",
    selection=report.SELECTION_FINAL,
    steps={"adarank_ta": 2000},
  )
  results["individual"] = {"MNIST": 0.996, "DTD": 0.8}
  results["methods"]["task_arithmetic"] = {"MNIST": 0.97, "DTD": 0.52}
  results["methods"]["adarank_ta"] = {"MNIST": np.float32(0.992), "DTD": 0.7, evaluate.AVERAGE_KEY: 0.84}
  results["timings_s"] = {"load_s": 1.25, "adarank_ta_s": 60.0}
  return results


def test_markdown_table_exact():
  # Norm. avg.: TA = mean(0.97 / 0.996, 0.52 / 0.8) = 0.81195;
  # AdaRank = mean(0.992 / 0.996, 0.7 / 0.8) = 0.93549 (mean of ratios, not 0.846 / 0.898 = 0.94209).
  expected = """Scores (%)

| Method | MNIST | DTD | Avg. | Norm. avg. |
|---|---:|---:|---:|---:|
| individual | 99.6 | 80.0 | 89.8 | 100.0 |
| task_arithmetic | 97.0 | 52.0 | 74.5 | 81.2 |
| adarank_ta | 99.2 | 70.0 | 84.6 | 93.5 |

Normalized scores (% of the individual fine-tuned model)

| Method | MNIST | DTD | Avg. |
|---|---:|---:|---:|
| task_arithmetic | 97.4 | 65.0 | 81.2 |
| adarank_ta | 99.6 | 87.5 | 93.5 |
"""
  assert report.markdown_table(_results()) == expected
  assert report.markdown_table(_results(), TASKS) == expected


def test_markdown_table_without_individual_scores():
  results = _results()
  results["individual"] = {}
  expected = """Scores (%)

| Method | DTD | Avg. |
|---|---:|---:|
| task_arithmetic | 52.0 | 52.0 |
| adarank_ta | 70.0 | 70.0 |
"""
  assert report.markdown_table(results, ["DTD"]) == expected


def test_markdown_table_missing_task_raises():
  with pytest.raises(ValueError, match=r"results for 'individual' lack tasks \['SVHN'\]"):
    report.markdown_table(_results(), TASKS + ["SVHN"])


def test_write_markdown_states_selection_and_timings(tmp_path):
  results = report.new_results(
    name="dbg", tasks=TASKS, model="tiny", selection=report.SELECTION_ORACLE, steps={"adarank_cart": 3}
  )
  results["individual"] = {"MNIST": 1.0, "DTD": 0.5}
  results["methods"]["adarank_cart"] = {"MNIST": 0.5, "DTD": 0.5}
  results["timings_s"] = {"adarank_cart_s": 2.0}
  report.write_markdown(tmp_path / "results.md", results)
  text = (tmp_path / "results.md").read_text()
  assert text.startswith(
    "# dbg\n\n- model: tiny\n- selection: best average test accuracy over evaluation "
    "points (oracle: selected on the labelled test set)\n- steps: adarank_cart 3\n"
    "- timings (s): adarank_cart_s 2.0\n"
  )
  assert text.endswith(report.markdown_table(results))
  assert "| adarank_cart | 50.0 | 50.0 | 50.0 | 75.0 |" in text
  with pytest.raises(TypeError, match="takes the Results dict"):
    report.write_markdown(tmp_path / "other.md", report.markdown_table(results))


def test_results_json_round_trip(tmp_path):
  results = _results()
  path = tmp_path / "out" / "results.json"
  report.write_results_json(path, results)
  loaded = json.loads(path.read_text())
  assert list(loaded["methods"]) == ["task_arithmetic", "adarank_ta"]
  assert loaded["methods"]["adarank_ta"]["MNIST"] == pytest.approx(0.992)
  assert loaded["individual"] == {"MNIST": 0.996, "DTD": 0.8}
  assert {k: loaded[k] for k in ("name", "model", "tasks", "selection", "steps", "timings_s")} == {
    "name": "vitb32_t8",
    "model": "ViT-B-32",
    "tasks": ["MNIST", "DTD"],
    "selection": "final step",
    "steps": {"adarank_ta": 2000},
    "timings_s": {"load_s": 1.25, "adarank_ta_s": 60.0},
  }
  assert report.read_results_json(path) == loaded
  assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temporary file left behind
  (tmp_path / "bad.json").write_text('{"methods": {}}')
  with pytest.raises(ValueError, match=r"bad.json: not a results file, missing keys \['individual'"):
    report.read_results_json(tmp_path / "bad.json")


def test_results_json_refuses_nan_and_keeps_old_file(tmp_path):
  path = tmp_path / "results.json"
  report.write_results_json(path, _results())
  before = path.read_text()
  bad = _results()
  bad["methods"]["broken"] = {"MNIST": float("nan"), "DTD": 0.5}
  with pytest.raises(ValueError, match="results.json: results hold a NaN or Inf"):
    report.write_results_json(path, bad)
  assert path.read_text() == before
  assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_new_results_validates():
  with pytest.raises(ValueError, match="selection must be one of"):
    report.new_results(name="c", tasks=TASKS, model="m", selection="best")
  with pytest.raises(ValueError, match="tasks must be distinct and not 'average'"):
    report.new_results(name="c", tasks=["a", "average"], model="m", selection=report.SELECTION_FINAL)


def _kept():
  rng = np.random.default_rng(0)
  kept = {
    f"transformer/resblocks/{i}/{name}/kernel": rng.integers(1, 17, size=3)
    for i in range(2)
    for name in ("attn/in_proj", "mlp/c_fc")
  }
  kept["transformer/resblocks/0/attn/in_proj/kernel"][1] = 0  # task 1 drops every component here
  return kept


def test_rank_heatmap_writes_png_and_counts(tmp_path):
  kept = _kept()
  layers = list(kept)[::-1]  # rows follow layer_names, not the dict order
  path = tmp_path / "rank.png"
  counts = report.rank_heatmap(kept, ["a", "b", "c"], path, layer_names=layers)
  np.testing.assert_array_equal(counts, [kept[layer] for layer in layers])
  assert counts.shape == (4, 3) and counts[-1, 1] == 0
  data = path.read_bytes()
  assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_rank_heatmap_default_rows_are_in_block_order(tmp_path):
  kept = {
    f"blocks/{i}/{name}": np.full(2, 4 if i < 10 else 0) for i in (10, 2, 0) for name in ("mlp", "attn")
  }
  assert report.layer_order(kept) == [
    "blocks/0/attn",
    "blocks/0/mlp",
    "blocks/2/attn",
    "blocks/2/mlp",
    "blocks/10/attn",
    "blocks/10/mlp",
  ]
  counts = report.rank_heatmap(kept, ["a", "b"], tmp_path / "rank.png")
  np.testing.assert_array_equal(counts, [[4, 4]] * 4 + [[0, 0]] * 2)


def test_rank_heatmap_rejects_bad_input(tmp_path):
  kept = _kept()
  with pytest.raises(ValueError, match=r"counts of shape \(3,\) per layer; expected \(2,\)"):
    report.rank_heatmap(kept, ["a", "b"], tmp_path / "r.png")
  with pytest.raises(ValueError, match=r"layers \['nope'\] are not in the counts"):
    report.rank_heatmap(kept, ["a", "b", "c"], tmp_path / "r.png", layer_names=["nope"])
  assert not (tmp_path / "r.png").exists()


def test_write_jsonl_appends(tmp_path):
  path = tmp_path / "log.jsonl"
  report.write_jsonl(path, {"step": 1, "loss": np.float32(0.5)})
  report.write_jsonl(path, {"step": 2, "loss": float("nan")})
  lines = path.read_text().splitlines()
  assert json.loads(lines[0]) == {"step": 1, "loss": 0.5}
  assert np.isnan(json.loads(lines[1])["loss"])


def test_metric_writer_jsonl_and_tensorboard(tmp_path):
  with report.MetricWriter(tmp_path) as writer:
    writer.scalars(0, {"loss": np.float32(2.0), "acc/mnist": 0.25})
    writer.scalars(10, {"loss": 1.5})
    writer.scalars(2**40, {"big": 1e40, "nan": float("nan")})  # multi-byte varint; float32 overflow -> inf
    with pytest.raises(ValueError, match=r"metric 'loss' at step 11 has shape \(2,\)"):
      writer.scalars(11, {"loss": np.zeros(2)})
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [{k: v for k, v in r.items() if k != "wall_time"} for r in records][:2] == [
    {"step": 0, "loss": 2.0, "acc/mnist": 0.25},
    {"step": 10, "loss": 1.5},
  ]
  event_files = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert len(event_files) == 1
  events = _read_events(event_files[0])
  assert events[0].file_version == "brain.Event:2"
  scalars = [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value]
  assert scalars[:3] == [(0, "loss", 2.0), (0, "acc/mnist", 0.25), (10, "loss", 1.5)]
  assert scalars[3] == (2**40, "big", np.inf) and scalars[4][:2] == (2**40, "nan") and np.isnan(scalars[4][2])
  assert [e.wall_time for e in events[1:]] == [r["wall_time"] for r in records]


def _read_events(path):
  """Every Event of a TFRecord event file, read back with TensorBoard's own reader."""
  from tensorboard.backend.event_processing import event_file_loader
  from tensorboard.compat.proto import event_pb2

  return [
    event_pb2.Event.FromString(record) for record in event_file_loader.RawEventFileLoader(str(path)).Load()
  ]


def test_metric_writer_does_not_load_torch(tmp_path):
  code = (
    "import sys, adarank_jax.core.evaluate, adarank_jax.experiment.report; "
    f"adarank_jax.experiment.report.MetricWriter({str(tmp_path)!r}).scalars(0, {{'loss': 1.0}}); "
    "print(sorted({'torch', 'tensorflow', 'tensorboardX'} & set(sys.modules)))"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
  assert out.strip() == "[]"
