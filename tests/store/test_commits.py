"""Commit policies of a training run: when a version is committed and what it says."""

from __future__ import annotations

import pytest

from spectralmc_server.training.policy import DEFAULT_MESSAGE, CommitPolicy


def test_every_n_steps() -> None:
    p = CommitPolicy(every_steps=5)
    assert [s for s in range(1, 21) if p.due(s, None)] == [5, 10, 15, 20]


def test_every_t_seconds() -> None:
    p = CommitPolicy(every_seconds=10.0)
    p.committed(None, now=100.0)
    assert not p.due(1, None, now=105.0)
    assert p.due(2, None, now=110.0)
    p.committed(None, now=110.0)
    assert not p.due(3, None, now=119.9) and p.due(4, None, now=120.0)


def test_only_when_validation_improved() -> None:
    p = CommitPolicy(every_steps=1, only_if_improved=True)
    assert p.due(1, 3.0)
    p.committed(3.0)
    assert not p.due(2, 3.5) and not p.due(3, 3.0) and not p.due(4, None)
    assert p.due(5, 2.9)
    assert p.improves(2.0) and not p.improves(None)


def test_final_only_by_default() -> None:
    p = CommitPolicy()
    assert p.final and not any(p.due(s, 1.0, now=1e12) for s in range(1, 100))


def test_message_templates() -> None:
    assert CommitPolicy().render(step=7, loss=0.5, val_bp=1.25) == DEFAULT_MESSAGE.format(step=7, loss=0.5, val_bp=1.25)
    assert CommitPolicy(message="s{step}").render(step=3, loss=0, val_bp=0) == "s3"
    for bad in ("{nope}", "{step:.2q}", "{0}"):
        with pytest.raises(ValueError, match="template"):
            CommitPolicy(message=bad)
    with pytest.raises(ValueError, match="N >= 1"):
        CommitPolicy(every_steps=0)
    with pytest.raises(ValueError, match="T > 0"):
        CommitPolicy(every_seconds=0)
