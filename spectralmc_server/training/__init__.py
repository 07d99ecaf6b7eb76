"""Training's side of the model lifecycle, above the store.

- policy.py: CommitPolicy, when a training run commits and what its messages say.
- commit.py: the quality gate (certify_checkpoint, GateResult) and the one commit
  step every committer runs (commit_certified): ``spectralmc train --store``, online
  training, its commit at shutdown and the admin commit route.
- history.py: a model's versions as data (list, inspect; ``spectralmc store`` and the
  admin routes) and their metrics exported for TensorBoard.
- resume.py: the version a run resumes from (``train --resume``, ``train.resume_from``:
  head, pin, served or N) and the run fact ``trained_from`` its commits record.
"""
