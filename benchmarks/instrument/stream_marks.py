"""Instrumentation for benchmarks/convert_daemon.py, run (``exec``) at the start of a timed convert process.

It records, in seconds since ``$QTBUILD_BENCH_T0`` (the benchmark's ``time.time()`` just before it
started the process), when the save request was sent (the Docker SDK's ``get_image``, or
``qtbuild.sources.docker_api.send`` where qtbuild speaks to the socket itself), when the
daemon's save stream delivered its first and its last chunk to qtbuild and when the EIF write
began and ended, and writes them as JSON to ``$QTBUILD_BENCH_MARKS`` at exit.  It imports nothing
of qtbuild or the SDK itself: the modules are patched as the process imports them (a
``sys.meta_path`` finder), so the process keeps its own import order and timing.  The patched
names — ``SaveStreamImage(chunks, ...)``, the pipeline's ``write_eif`` and the SDK's
``ImageApiMixin.get_image`` or ``docker_api.send`` — exist in every qtbuild version the benchmark
compares (whichever the version uses), so the reference interpreter is instrumented alike.
"""

import atexit
import json
import os
import sys
import time
from importlib.machinery import PathFinder

_T0 = float(os.environ["QTBUILD_BENCH_T0"])
_MARKS: dict = {}


def _now() -> float:
    return round(time.time() - _T0, 4)


def _timed_chunks(chunks):
    """``chunks``, marking when the first and (so far) the last one arrived."""
    try:
        for chunk in chunks:
            _MARKS.setdefault("first byte", _now())
            _MARKS["last byte"] = _now()
            yield chunk
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def _patch_save_stream(module) -> None:
    init = module.SaveStreamImage.__init__

    def __init__(self, chunks, *args, **kwargs):
        init(self, _timed_chunks(chunks), *args, **kwargs)

    module.SaveStreamImage.__init__ = __init__


def _patch_pipeline(module) -> None:
    write_eif = getattr(module, "write_eif", None)
    if write_eif is None:  # a pipeline that writes otherwise: no write marks
        return

    def timed_write_eif(*args, **kwargs):
        _MARKS["write start"] = _now()
        try:
            return write_eif(*args, **kwargs)
        finally:
            _MARKS["write end"] = _now()

    module.write_eif = timed_write_eif


def _patch_docker_api(module) -> None:
    send = module.send

    def timed_send(address, path, **kwargs):
        if "/get" in path.partition("?")[0]:
            _MARKS.setdefault("request", _now())  # the save request leaves now (then waits for the export)
        return send(address, path, **kwargs)

    module.send = timed_send


def _patch_docker_images(module) -> None:
    get_image = module.ImageApiMixin.get_image

    def timed_get_image(self, *args, **kwargs):
        _MARKS.setdefault("request", _now())  # the save request leaves now (the SDK sends, then waits)
        return get_image(self, *args, **kwargs)

    module.ImageApiMixin.get_image = timed_get_image


_PATCHES = {"qtbuild.sources.save_stream": _patch_save_stream, "qtbuild.convert.pipeline": _patch_pipeline,
            "docker.api.image": _patch_docker_images, "qtbuild.sources.docker_api": _patch_docker_api}


class _Patcher:
    """A meta path finder that patches the modules of :data:`_PATCHES` right after they execute."""

    def find_spec(self, name, path=None, target=None):
        patch = _PATCHES.get(name)
        spec = PathFinder.find_spec(name, path) if patch is not None else None
        if spec is None or spec.loader is None:
            return None
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


def _write_marks() -> None:
    _MARKS["exit"] = _now()
    with open(os.environ["QTBUILD_BENCH_MARKS"], "w") as file:
        json.dump(_MARKS, file)


sys.meta_path.insert(0, _Patcher())
atexit.register(_write_marks)
