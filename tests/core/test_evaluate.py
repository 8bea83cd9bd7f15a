"""Metrics against sklearn and naive formulas, padding masks, one compile across batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from adarank_jax.core import evaluate


def _confusion(labels, predictions, num_classes, mask=None):
  return evaluate.confusion_matrix(labels, predictions, num_classes, mask)


@pytest.mark.parametrize("num_classes", [2, 3, 7])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_sklearn(num_classes, seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, size=200)
  # Correlated predictions: right 60% of the time, random otherwise.
  predictions = np.where(rng.random(200) < 0.6, labels, rng.integers(0, num_classes, size=200))
  confusion = _confusion(labels, predictions, num_classes)
  np.testing.assert_array_equal(
    confusion, sk_metrics.confusion_matrix(labels, predictions, labels=range(num_classes))
  )
  expected_accuracy = sk_metrics.accuracy_score(labels, predictions)
  assert evaluate.accuracy(confusion) == pytest.approx(expected_accuracy, abs=1e-12)
  assert evaluate.matthews_corrcoef(confusion) == pytest.approx(
    sk_metrics.matthews_corrcoef(labels, predictions), abs=1e-12
  )


def test_binary_matthews_matches_textbook_formula():
  labels = np.array([1, 1, 1, 0, 0, 0, 0, 1, 0, 1])
  predictions = np.array([1, 0, 1, 0, 0, 1, 0, 1, 1, 1])
  tp = np.sum((labels == 1) & (predictions == 1))
  tn = np.sum((labels == 0) & (predictions == 0))
  fp = np.sum((labels == 0) & (predictions == 1))
  fn = np.sum((labels == 1) & (predictions == 0))
  expected = (tp * tn - fp * fn) / np.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
  assert evaluate.matthews_corrcoef(_confusion(labels, predictions, 2)) == pytest.approx(expected, abs=1e-12)


def test_matthews_degenerate_and_perfect_cases_match_sklearn():
  labels = np.array([0, 1, 2, 1, 0])
  constant = np.zeros(5, int)  # every prediction in one class: denominator 0 -> 0.0
  assert evaluate.matthews_corrcoef(_confusion(labels, constant, 3)) == 0.0
  assert sk_metrics.matthews_corrcoef(labels, constant) == 0.0
  assert evaluate.matthews_corrcoef(_confusion(labels, labels, 3)) == pytest.approx(1.0)
  inverted = 1 - labels[labels < 2]
  assert evaluate.matthews_corrcoef(_confusion(labels[labels < 2], inverted, 2)) == pytest.approx(-1.0)


def test_mask_drops_padding_rows():
  labels = np.array([0, 1, 2, 2, 0, 0])
  predictions = np.array([0, 1, 1, 2, 2, 2])
  mask = np.array([1, 1, 1, 1, 0, 0])  # the last two (wrong) rows are padding
  confusion = _confusion(labels, predictions, 3, mask)
  assert confusion.sum() == 4
  assert evaluate.accuracy(confusion) == pytest.approx(0.75)
  assert evaluate.matthews_corrcoef(confusion) == pytest.approx(
    sk_metrics.matthews_corrcoef(labels[:4], predictions[:4])
  )


def test_bad_metric_inputs_raise():
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
    _confusion(np.array([0, 3]), np.array([0, 1]), 3)
  with pytest.raises(ValueError, match="no real"):
    evaluate.accuracy(_confusion(np.array([0]), np.array([0]), 2, mask=np.array([0])))


def test_normalized_scores_average_of_ratios():
  merged = {"a": 0.5, "b": 0.9, evaluate.AVERAGE_KEY: 0.7}
  individual = {"a": 1.0, "b": 0.6}
  normalized = evaluate.normalized_scores(merged, individual)
  assert list(normalized) == ["a", "b", evaluate.AVERAGE_KEY]
  assert normalized["a"] == pytest.approx(0.5)
  assert normalized["b"] == pytest.approx(1.5)
  assert normalized[evaluate.AVERAGE_KEY] == pytest.approx(1.0)  # mean of ratios, not 0.7 / 0.8
  with pytest.raises(ValueError, match="no individual .* task 'b'"):
    evaluate.normalized_scores(merged, {"a": 1.0})
  # A fine-tuned score <= 0 (a Matthews correlation can be) has no meaningful ratio: n/a, left out of the mean.
  undefined = evaluate.normalized_scores(merged, {"a": 0.0, "b": 0.2})
  assert undefined["a"] is None and undefined[evaluate.AVERAGE_KEY] == pytest.approx(4.5)  # 0.9 / 0.2


def _linear_task(seed, num_examples, batch_size, dim=5, num_classes=4):
  """A random linear classifier and padded, masked batches of its data, with numpy reference predictions."""
  rng = np.random.default_rng(seed)
  weights = rng.normal(size=(dim, num_classes)).astype(np.float32)
  x = rng.normal(size=(num_examples, dim)).astype(np.float32)
  labels = rng.integers(0, num_classes, size=num_examples)
  reference = np.argmax(x @ weights, axis=-1)
  batches = []
  for start in range(0, num_examples, batch_size):
    rows = min(batch_size, num_examples - start)
    pad = batch_size - rows
    batches.append(
      {
        "x": np.pad(x[start : start + rows], ((0, pad), (0, 0))),
        # Padding rows get label 0 and a zero input, which the model would often "get right" if they counted.
        "label": np.pad(labels[start : start + rows], (0, pad)),
        "mask": np.pad(np.ones(rows, np.int32), (0, pad)),
      }
    )
  return weights, batches, labels, reference


def _counting_predict_fn(weights):
  traces = []

  @jax.jit
  def predict(inputs):
    traces.append(1)  # runs only while tracing
    assert set(inputs) == {"x"}  # labels and mask never reach the model
    return inputs["x"] @ jnp.asarray(weights)

  return predict, traces


def test_evaluate_task_matches_numpy_with_one_compile():
  weights, batches, labels, reference = _linear_task(0, num_examples=23, batch_size=8)
  predict, traces = _counting_predict_fn(weights)
  acc = evaluate.evaluate_task(predict, batches, metric="accuracy")
  assert acc == pytest.approx(np.mean(reference == labels))
  assert len(traces) == 1  # 3 batches, the last one padded: a single compile
  mcc = evaluate.evaluate_task(predict, iter(batches), metric="matthews")
  assert mcc == pytest.approx(sk_metrics.matthews_corrcoef(labels, reference))
  assert len(traces) == 1


def test_unpadded_last_batch_is_refused():
  weights, batches, _, _ = _linear_task(0, num_examples=20, batch_size=8)
  batches[-1] = {k: v[:4] for k, v in batches[-1].items()}
  predict, traces = _counting_predict_fn(weights)
  with pytest.raises(
    evaluate.BatchError,
    match=r"batch 2 differs .*'x': \(\(4, 5\), 'float32'\) vs "
    r"\(\(8, 5\), 'float32'\).*Pad",
  ):
    evaluate.evaluate_task(predict, batches, metric="accuracy")
  assert len(traces) == 1


def test_batch_errors_name_the_problem():
  weights, batches, _, _ = _linear_task(0, num_examples=8, batch_size=8)
  predict, _ = _counting_predict_fn(weights)
  with pytest.raises(evaluate.BatchError, match="batch 0 has no 'mask' key"):
    evaluate.evaluate_task(predict, [{"x": batches[0]["x"], "label": batches[0]["label"]}], metric="accuracy")
  with pytest.raises(evaluate.BatchError, match=r"batch 0: labels must lie in \[0, 4\)"):
    evaluate.evaluate_task(predict, [{**batches[0], "label": batches[0]["label"] + 10}], metric="accuracy")
  with pytest.raises(evaluate.BatchError, match="batch 0: 'x' is a list, expected a numpy array"):
    evaluate.evaluate_task(predict, [{**batches[0], "x": batches[0]["x"].tolist()}], metric="accuracy")
  with pytest.raises(evaluate.BatchError, match="no batches"):
    evaluate.evaluate_task(predict, [], metric="accuracy")
  with pytest.raises(ValueError, match="unknown metric 'f1'"):
    evaluate.evaluate_task(predict, batches, metric="f1")
