"""How this process's ONNX Runtime sessions get their threads.

Two ways, chosen once per process before its first session:

* ``global`` — every session shares ONNX Runtime's global intra-op thread pool, whose idle workers spin
  briefly. The target and the drafter alternate many times per token; with a pool each, one session's
  spinning workers starve the other on the same cores, and with spinning off every parallel region pays for
  waking its workers (on this project's 2-core machine a 1-row target step took 5-6 ms with the shared pool,
  8.6 ms with per-session pools). Once the global pool exists ONNX Runtime refuses per-session threads to
  every later session in the process, including ones made by other libraries (onnxruntime.quantization's
  calibrator, for one), so a process only opts in when it owns all its sessions: the ``dream-run``,
  ``dream-serve`` and ``dream-bench`` commands do, through ``use_global_pool``.
* ``per-session`` (the library default, safe to embed next to other ONNX Runtime users) — each session has
  its own pool with spinning off.

``DREAM_ORT_THREADS=global`` or ``per-session`` overrides both.
"""

from __future__ import annotations

import os

_pool_threads: int | None = None   # the global pool's size once made
_wanted = "per-session"


def use_global_pool() -> None:
    """Make this process's later sessions share the global thread pool (see the module docstring)."""
    global _wanted
    _wanted = "global"


def mode() -> str:
    value = os.environ.get("DREAM_ORT_THREADS") or _wanted
    if value not in ("global", "per-session"):
        raise ValueError(f"DREAM_ORT_THREADS={value!r}: expected global or per-session")
    return value


def session_options(threads: int | None = None):
    """SessionOptions for a session of this process (see the module docstring)."""
    import onnxruntime as ort  # at first use: importing the runtime loads no heavy library

    global _pool_threads
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if _pool_threads is None and mode() == "per-session":
        # several sessions share few cores: spinning threads of one session starve the next call
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            opts.intra_op_num_threads = threads
        return opts
    if _pool_threads is None:
        from onnxruntime.capi import _pybind_state

        _pool_threads = int(threads or os.cpu_count() or 1)
        _pybind_state.set_global_thread_pool_sizes(_pool_threads, 1)
    opts.use_per_session_threads = False
    return opts


def pool_threads() -> int | None:
    """The global pool's thread count (None: not made in this process)."""
    return _pool_threads
