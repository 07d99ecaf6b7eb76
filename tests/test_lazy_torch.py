"""spectralmc_server/lazy_torch.py, each case in a fresh interpreter (this one has torch
imported already): ``import torch`` binds a stand-in until something reads from it; the
first read imports the real torch once, even from several threads at a time; later
reads, patches and imports all meet the one real module."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_torch_is_imported_at_its_first_use() -> None:
    out = run(
        """
        import sys
        from spectralmc_server import lazy_torch
        assert lazy_torch.install()
        import torch
        kept = [torch]  # the stand-in, out of the module names the load rebinds
        assert not lazy_torch.loaded() and "torch._C" not in sys.modules
        assert torch.__spec__ is not None  # what import reads: no load
        x = torch.tensor([1.0, 2.0]).sum()  # the first read
        assert lazy_torch.loaded() and "torch._C" in sys.modules
        import torch as again
        assert again is sys.modules["torch"] and again is not kept[0]
        assert torch is again  # this module's name was rebound to torch itself
        assert isinstance(x, kept[0].Tensor) and float(x) == 3.0
        again.patched_here = 7  # a patch of the real module is seen through the stand-in
        assert kept[0].patched_here == 7
        assert "tensor" in dir(kept[0])
        assert not lazy_torch.install()  # torch is imported: nothing to do
        print("ok")
        """
    )
    assert out.strip() == "ok"


def test_threads_reading_at_once_import_it_once() -> None:
    out = run(
        """
        import sys, threading
        from spectralmc_server import lazy_torch
        lazy_torch.install()
        import torch
        start = threading.Barrier(8)
        got = []
        def read():
            start.wait()
            got.append(torch.float64)
        threads = [threading.Thread(target=read) for _ in range(8)]
        for t in threads: t.start()
        for t in threads: t.join()
        assert len(got) == 8 and all(g is sys.modules["torch"].float64 for g in got)
        print("ok")
        """
    )
    assert out.strip() == "ok"


def test_the_http_side_modules_import_without_torch() -> None:
    """What ``spectralmc serve`` imports for an HTTP process (the app, its routes,
    settings, the batcher and the pricing front door) reads nothing from torch."""
    out = run(
        """
        import sys
        from spectralmc_server import lazy_torch
        lazy_torch.install()
        import spectralmc_server.cli.serve, spectralmc_server.service.app
        import spectralmc_server.service.engine_process, spectralmc_server.cli.serve_workers
        from spectralmc_server.settings import Settings
        Settings()
        print(lazy_torch.loaded(), "torch._C" in sys.modules)
        """
    )
    assert out.strip() == "False False"


def test_nothing_is_done_where_torch_cannot_be_found() -> None:
    out = run(
        """
        import importlib.util
        from spectralmc_server import lazy_torch
        importlib.util.find_spec = lambda name, *a: None
        print(lazy_torch.install())
        """
    )
    assert out.strip() == "False"


def test_a_failed_import_leaves_the_stand_in_for_the_next_read() -> None:
    """torch failing to import (a broken install, memory exhausted) raises at the read
    that needed it, and the stand-in stays: a later read tries again."""
    out = run(
        """
        import importlib, sys
        from spectralmc_server import lazy_torch
        lazy_torch.install()
        import torch
        real_import = importlib.import_module
        def failing(name, *args):
            if name == "torch":
                raise ImportError("torch is broken here")
            return real_import(name, *args)
        importlib.import_module = failing
        try:
            torch.cat
        except ImportError as exc:
            assert "broken" in str(exc)
        else:
            raise AssertionError("no error")
        assert not lazy_torch.loaded() and sys.modules["torch"] is torch
        importlib.import_module = real_import
        assert float(torch.ones(2).sum()) == 2.0 and lazy_torch.loaded()
        print("ok")
        """
    )
    assert out.strip() == "ok"
