"""Messages between the HTTP process and the engine process: length-prefixed frames of
pickle protocol 5 (numpy arrays out of band, zero-copy on send) over a private AF_UNIX
stream socket, unpickled with an allow-list (see :mod:`spectralmc_server.ipc.framing`).

Torch-free on purpose: the HTTP process imports this package and must not load torch.
"""
