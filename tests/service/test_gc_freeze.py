"""``gc_freeze`` and ``gc_gen0_threshold`` (service/app.py ``gc_ctx``): once the app has
started, what is loaded is frozen out of the cyclic GC's reach and young collections are
rarer; at shutdown both are undone. (Other tests start their apps with ``gc_freeze``
off: a full collection over the test process's heap at every start was slow.)"""

from __future__ import annotations

import gc

from server_util import MakeClient


async def test_the_app_freezes_what_it_loaded_and_undoes_it_at_shutdown(make_client: MakeClient) -> None:
    before_threshold = gc.get_threshold()
    before_frozen = gc.get_freeze_count()
    client = await make_client(gc_freeze=True, gc_gen0_threshold=12_345)
    assert (await client.get("/healthz")).status == 200
    assert gc.get_freeze_count() > before_frozen  # the loaded objects are in the permanent generation
    assert gc.get_threshold() == (12_345, *before_threshold[1:])
    await client.close()
    assert gc.get_freeze_count() == 0  # unfrozen: the next collection may reclaim them
    assert gc.get_threshold() == before_threshold


async def test_without_the_freeze_only_the_threshold_changes(make_client: MakeClient) -> None:
    before_threshold = gc.get_threshold()
    client = await make_client(gc_freeze=False, gc_gen0_threshold=23_456)
    assert (await client.get("/healthz")).status == 200
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == (23_456, *before_threshold[1:])
    await client.close()
    assert gc.get_threshold() == before_threshold
