"""Training's side of the model lifecycle, above the store.

- policy.py: CommitPolicy, when a training run commits and what its messages say.
- commit.py: the quality gate (certify_checkpoint, GateResult) and the one commit
  step every committer runs (commit_certified): ``spectralmc train --store``, online
  training, its commit at shutdown and the admin commit route.
- history.py: a model's versions as data (list, inspect; ``spectralmc store`` and the
  admin routes) and their metrics exported for TensorBoard.
"""
