"""The pricing use case, under both entrypoints (``spectralmc price`` and the server).

- :mod:`.schemas`: the request and response schemas; the measures' one list.
- :mod:`.valuation`: checks beyond the schema and the :class:`~.valuation.Valuer`.
- :mod:`.resolve`: contracts by reference made explicit against a snapshot.
- :mod:`.door`: the front door: :func:`~.door.admit` (a body in, a checked request
  out) and :func:`~.door.value_batch` (requests of one batch in, answers out).

No HTTP and no runtime here: the server's routes, batcher and engine live in
``service/``; this package imports nothing from it.
"""
