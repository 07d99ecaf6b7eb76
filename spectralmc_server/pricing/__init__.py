"""The pricing use case, under both entrypoints (``spectralmc price`` and the server).

- :mod:`.schemas`: the request and response schemas; the measures' one list.
- :mod:`.book`: a request's contracts as columns.
- :mod:`.cells`, :mod:`.contract_rules`, :mod:`.columns`: columnar books checked with
  numpy (each field's rule, the contract rules across fields), and answers as columns.
- :mod:`.arrow`: Arrow IPC books in and answers out.
- :mod:`.valuation`: checks beyond the schema and the :class:`~.valuation.Valuer`.
- :mod:`.resolve`: contracts by reference made explicit against a snapshot.
- :mod:`.door`: the front door: :func:`~.door.admit` (a body in, a checked request
  out) and :func:`~.door.value_batch` (requests of one batch in, answers out).
- :mod:`.calibration`: a snapshot's vol surface fitted through a served model or the
  analytic CF (engine/fit.py), with a report per quote.
- :mod:`.errors`: a refusal with field details.

No HTTP and no runtime here: the server's routes, batcher and engine live in
``service/`` and ``engine_service/``; this package imports nothing from them.
"""
