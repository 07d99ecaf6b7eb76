"""The served models as plain data (engine/view.py, engine_service/views.py): what the HTTP side
reads in place of the engine's objects. A view holds no torch object and pickles small;
the directory's readings are those the routes answer with; a swap is heard once."""

from __future__ import annotations

import pickle
import pickletools
from dataclasses import replace
from typing import Any

import pytest

from spectralmc_server.engine.checkpoint import read_dir
from spectralmc_server.engine.served import ServedModel, load_served_model
from spectralmc_server.engine.view import ModelView
from spectralmc_server.engine_service.views import Directory, ModelDirectory, TrackerView
from spectralmc_server.models import bundled_models


@pytest.fixture(scope="module")
def served() -> dict[str, ServedModel]:
    return {
        n: load_served_model(read_dir(p, need_training=False), name=n, version=1) for n, p in bundled_models().items()
    }


def modules_in(blob: bytes) -> set[str]:
    """The modules a pickle names (its GLOBAL / STACK_GLOBAL operands)."""
    out: set[str] = set()
    strings: list[str] = []
    for op, arg, _ in pickletools.genops(blob):
        if isinstance(arg, str):
            strings.append(arg)
        if op.name == "STACK_GLOBAL":
            out.add(strings[-2])
        elif op.name == "GLOBAL" and isinstance(arg, str):
            out.add(arg.split(" ")[0])
    return out


def test_a_view_is_the_served_versions_plain_data(served: dict[str, ServedModel]) -> None:
    for name, model in served.items():
        view = model.view
        assert view is model.view  # built once per loaded version
        assert (view.name, view.process, view.version, view.content_hash) == (
            name,
            model.process.name,
            1,
            model.content_hash,
        )
        assert [r[0] for r in view.param_ranges] == list(model.process.param_names)
        assert view.ranges == tuple((r.name, r.low, r.high) for r in model.domain.ranges)
        assert view.moneyness == model.domain.certified_moneyness
        assert view.qualified is model.pricer.qualified is True  # the bundled models are certified
        assert view.certificate is model.certificate
        blob = pickle.dumps(view, protocol=5)
        assert not any(m.startswith("torch") for m in modules_in(blob)), modules_in(blob)
        back = pickle.loads(blob)
        assert isinstance(back, ModelView) and back == view
        lows, highs = view.box()
        assert lows.tolist() == [r.low for r in model.domain.ranges]
        assert highs.tolist() == [r.high for r in model.domain.ranges]


def tracker(name: str, served: ModelView | None, **kw: Any) -> TrackerView:
    base = TrackerView(
        name=name,
        mode="tracking",
        served=served,
        forced=None,
        swaps=0,
        last_error=None,
        consecutive_failures=0,
        total_failures=0,
        backoff_seconds=5.0,
        last_good_poll=1.0,
        rejected=None,
        rejections={},
        why_none=None if served is not None else "no version in the store yet",
    )
    return replace(base, **kw)


def test_the_directory_reads_as_the_routes_answer(served: dict[str, ServedModel]) -> None:
    gbm, heston = served["gbm"].view, served["heston"].view
    rejected = {"version": 3, "kind": "gate", "reasons": ["price p95 too high"], "certificate": "abc"}
    d = Directory(
        (
            tracker("gbm", gbm, forced=("price p95 2 bp > 1 bp",), mode="pinned"),
            tracker("heston", heston, consecutive_failures=2, last_error="boom", backoff_seconds=20.0),
            tracker("merton", None, rejected=rejected, why_none="version 3 fails its quality gate"),
        )
    )
    assert d.snapshot() == {"gbm": gbm, "heston": heston}
    assert d.not_ready() == "no version loaded for merton (version 3 fails its quality gate)"
    assert d.forced() == {"gbm": {"version": 1, "gate": ["price p95 2 bp > 1 bp"]}}
    assert d.rejected() == {"merton": rejected}
    assert d.degraded() == [
        "heston: serving version 1; 2 failed store poll(s) in a row, next try in 20 s; last error: boom"
    ]
    rows = d.describe()
    assert [r["name"] for r in rows] == ["gbm", "heston", "merton"]
    assert rows[0]["mode"] == "pinned" and rows[0]["forced"] == ["price p95 2 bp > 1 bp"]
    assert rows[2]["version"] is None and rows[2]["rejected"] == rejected
    assert [s.forced for s in d.states()] == [True, False, False]
    assert Directory((tracker("gbm", gbm),)).not_ready() is None
    # two models of one process: the first answers it (as the host's snapshot does)
    other = replace(gbm, name="gbm2", version=7)
    assert Directory((tracker("gbm", gbm), tracker("gbm2", other))).snapshot() == {"gbm": gbm}


def test_a_swap_is_heard_once_and_the_first_picture_is_no_swap(served: dict[str, ServedModel]) -> None:
    v1 = served["gbm"].view
    v2 = replace(v1, version=2, content_hash="sha256:" + "2" * 64)
    heard: list[tuple[str, int]] = []
    models = ModelDirectory()
    models.swap_listeners.append(lambda name, version: heard.append((name, version)))
    models.update(Directory((tracker("gbm", v1), tracker("merton", None))))
    assert heard == []  # the first picture: what is loaded at start
    models.update(Directory((tracker("gbm", v1, last_good_poll=2.0), tracker("merton", None))))
    assert heard == []  # a poll that changed nothing served
    models.update(Directory((tracker("gbm", v2), tracker("merton", None))))
    assert heard == [("gbm", 2)]
    models.update(Directory((tracker("gbm", v2), tracker("merton", served["merton"].view))))
    assert heard == [("gbm", 2), ("merton", 1)]  # a first version after none is a swap too
    models.update(Directory((tracker("gbm", v1), tracker("merton", served["merton"].view))))
    assert heard[-1] == ("gbm", 1)  # a rollback
    assert models.current.snapshot()["gbm"] is v1
