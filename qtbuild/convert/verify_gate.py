"""Layer verification that runs on into the write phase, and the gate that holds the output until it passed.

Layers read in place (:mod:`qtbuild.convert.verify_ahead`) are hashed on worker threads while the
tree is built.  The largest layer's SHA-256 is one stream, so it may well outlast the tree; waiting
for it there leaves a CPU idle.  Inside :func:`deferred_verification` that wait moves to the end of
the customer ramdisk instead: the EIF is written (to a temporary file) while the last layers are
still being verified, and :meth:`Deferral.gate` makes the ramdisk's stream end only once every
verification passed.  A writer therefore reaches its commit (renaming the temporary file into
place), and a signer sees a PCR0, only for verified layers; a failure raises the verification's
own :class:`~qtbuild.errors.ImageError` from the stream, and the writer removes its temporary file.

Contract:

* Within the block, a :class:`~qtbuild.convert.verify_ahead.VerifyAhead` that ends without error
  hands its running verifications to the block's :class:`Deferral` (:meth:`Deferral.adopt`)
  instead of waiting for them, and its ``result()`` only raises failures already known.  Data
  read from such layers may go only into output that is discarded unless :meth:`Deferral.finish`
  returns — in practice, into a section source wrapped by :meth:`Deferral.gate`.
* An exception leaving the block is replaced by a verification failure when there is one (a
  tampered layer is reported as such, not as whatever its bytes made fail).
* Leaving the block stops the verifications still running (between chunks) and waits for them.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from qtbuild.formats.eif_writer import SectionSource


class Verifications(Protocol):
    """Verifications running on worker threads (a :class:`~qtbuild.convert.verify_ahead.VerifyAhead`)."""

    def first_failure(self) -> BaseException | None:
        """Wait for every verification; the failure of the lowest layer that failed, else None."""

    def close(self) -> None:
        """Stop the verifications still running and wait for them."""


class Deferral:
    """Verifications handed over from the tree to the write phase (see the module docstring)."""

    def __init__(self) -> None:
        self._adopted: list[Verifications] = []
        #: Set by a worker the moment a verification fails, so the stream stops early.
        self.failed = threading.Event()

    def adopt(self, verifications: Verifications) -> None:
        """Take over ``verifications``: :meth:`finish` waits for them, leaving the block stops them."""
        self._adopted.append(verifications)

    def first_failure(self) -> BaseException | None:
        """Wait for every adopted verification; the first failure (in adoption, then layer order), else None."""
        for verifications in self._adopted:
            failure = verifications.first_failure()
            if failure is not None:
                return failure
        return None

    def finish(self) -> None:
        """Wait for every adopted verification; raise the first failure."""
        failure = self.first_failure()
        if failure is not None:
            raise failure

    def gate(self, source: SectionSource) -> SectionSource:
        """``source`` whose chunk stream stops early once a verification failed, and ends only
        after :meth:`finish` passed (a failure is raised from the stream instead)."""
        return _GatedRing(source, self) if hasattr(source, "ring_chunks") else _Gated(source, self)

    def close(self) -> None:
        for verifications in self._adopted:
            verifications.close()


class _Gated:
    """A section source whose stream ends only once the deferral's verifications passed."""

    def __init__(self, source: SectionSource, deferral: Deferral) -> None:
        self._source, self._deferral = source, deferral

    @property
    def size(self):  # untyped on purpose: whatever the wrapped source declares, the writer reads
        return self._source.size

    def chunks(self) -> Iterator[bytes | bytearray | memoryview]:
        return self._through(self._source.chunks())

    def _through(self, chunks: Iterator) -> Iterator:
        failed = self._deferral.failed
        for chunk in chunks:
            if failed.is_set():
                break
            yield chunk
        self._deferral.finish()  # the generator ends (and the writer goes on) only when this passes


class _GatedRing(_Gated):
    """:class:`_Gated` for a source that writes into a ring of buffers (``ring_chunks``)."""

    def ring_chunks(self, buffers: int, chunk_size: int) -> Iterator[memoryview]:
        return self._through(self._source.ring_chunks(buffers, chunk_size))  # type: ignore[attr-defined]


_CURRENT: ContextVar[Deferral | None] = ContextVar("qtbuild_verify_deferral", default=None)


def current_deferral() -> Deferral | None:
    """The deferral of the innermost :func:`deferred_verification` block on this thread, if any."""
    return _CURRENT.get()


@contextlib.contextmanager
def deferred_verification() -> Iterator[Deferral]:
    """A block in which layer verification may run on past the tree (see the module docstring)."""
    deferral = Deferral()
    token = _CURRENT.set(deferral)
    try:
        yield deferral
    except Exception:
        failure = deferral.first_failure()
        if failure is not None:
            raise failure from None
        raise
    finally:
        _CURRENT.reset(token)
        deferral.close()
