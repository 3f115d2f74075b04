"""rflow_jax.train.periodic: which periodic work the loop does after each step."""

import ml_collections

from rflow_jax.train import periodic


def _train(**overrides):
  t = ml_collections.ConfigDict(
      dict(num_steps=10, log_every=4, checkpoint_every=5, sample_every=3, eval_every=6, evaluators=("shapes",))
  )
  t.update(overrides)
  return t


def test_is_time():
  assert [s for s in range(13) if periodic.is_time(s, 4)] == [4, 8, 12]
  assert not any(periodic.is_time(s, 0) for s in range(13))  # 0 = never.


def test_due_per_step():
  due = {s: periodic.due(s, _train(), stopping=False) for s in range(1, 11)}
  assert [s for s, d in due.items() if d.log] == [4, 8, 10]  # And always at the last step.
  assert [s for s, d in due.items() if d.checkpoint] == [5, 10]
  assert [s for s, d in due.items() if d.preview] == [3, 6, 9]  # The last step's preview comes after the loop.
  assert [s for s, d in due.items() if d.evaluate] == [6]


def test_stopping_logs_and_checkpoints_only():
  assert periodic.due(6, _train(), stopping=True) == periodic.Due(
      log=True, checkpoint=True, preview=False, evaluate=False
  )


def test_no_evaluators_no_evaluation():
  assert not periodic.due(6, _train(evaluators=()), stopping=False).evaluate
