"""Safe extraction of a cpio newc archive into a directory.

Contract of :func:`unpack_archive`:

* Nothing is ever created, changed or followed outside ``dest``: paths come canonical from
  :func:`qtbuild.formats.cpio.iter_archive` (no ``..``, no absolute paths), every parent directory is
  opened component by component from a descriptor of ``dest`` with
  ``O_NOFOLLOW | O_DIRECTORY`` (so a symlink planted by an earlier member is refused, never
  traversed), and files are created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` relative to it.
* Existing paths: a directory over a directory keeps it (its mode etc. are updated at the end);
  anything else is removed first (``unlinkat``, which removes a symlink itself, never its target;
  an empty directory is removed, a non-empty one is an error).  ``dest`` may already hold files
  (e.g. from an earlier archive of the same image); they are overlaid by these rules.
* Parents must exist (as members or already in ``dest``); missing ones are an error, as the
  kernel would drop such members.
* Device nodes, FIFOs and sockets are not created: their paths go to ``skipped_devices``.
  setuid/setgid bits are stripped from files and directories (setgid kept with
  ``keep_setgid``): the paths stripped of a bit go to ``stripped_setid``.  Ownership is applied
  only with ``preserve_owner`` (never following symlinks); with ``ids`` too, archive ids are
  shifted into that subordinate range (uid N is host uid ``ids.uid + N``) and an id outside it
  is refused, naming the path.  mtimes are applied to everything (symlinks included, not
  followed).
* Hardlinks: regular members sharing ``(dev, ino)`` with ``nlink`` > 1 become links of the file
  created for the first of them; data is written whenever a link carries some (newc writers,
  GNU cpio and ours put it on the last link; others on the first or on all) — like the kernel.
  Their mode/owner/mtime (from the last link) are applied at the end.
* Directory modes, owners and mtimes are applied after everything else, deepest first, so a
  ``0555`` directory can still be filled and its mtime is not disturbed by its contents.
* A hostile or malformed archive raises :class:`~qtbuild.formats.errors.CpioFormatError` naming the path;
  ``OSError`` is only raised for environment problems (no space, permission denied, ...).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

from qtbuild.formats.cpio import CpioMember, MemberData, iter_archive
from qtbuild.formats.errors import CpioFormatError
from qtbuild.runtime.sandbox.subids import IdRange

__all__ = ["UnpackReport", "unpack_archive"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_REWRITE_FLAGS = os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_REOPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_SETID = stat.S_ISUID | stat.S_ISGID
# errno values an archive can provoke by its own structure (as opposed to ENOSPC, EACCES, ...).
_ARCHIVE_ERRNOS = frozenset({
    errno.ELOOP, errno.ENOTDIR, errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOENT,
    errno.ENAMETOOLONG, errno.EMLINK,
})


@dataclass
class UnpackReport:
    """What :func:`unpack_archive` did.  ``files`` counts inodes created for regular members,
    ``hardlinks`` the extra links made to them; ``dirs`` and ``symlinks`` count members."""

    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    skipped_devices: list[bytes] = field(default_factory=list)
    stripped_setid: list[bytes] = field(default_factory=list)


@dataclass
class _Inode:
    """A hardlinked file created from the archive: the paths that still link to it (in creation
    order) and the member whose metadata it takes."""

    paths: list[bytes]
    member: CpioMember


def unpack_archive(
    fileobj,
    dest: str | os.PathLike,
    *,
    archive_size: int | None = None,
    preserve_owner: bool = False,
    keep_setgid: bool = False,
    ids: IdRange | None = None,
) -> UnpackReport:
    """Extract the newc archive read from ``fileobj`` into ``dest`` (created if missing).

    See the module docstring for the safety contract.  Returns what was extracted or skipped.
    """
    with suppress(FileExistsError):
        os.mkdir(dest, 0o755)
    root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        extractor = _Extractor(root_fd, preserve_owner, ids, stat.S_ISUID if keep_setgid else _SETID)
        for member, data in iter_archive(fileobj, archive_size=archive_size):
            extractor.extract(member, data)
        extractor.finish()
        return extractor.report
    finally:
        os.close(root_fd)


_REASONS = {
    errno.ELOOP: "a parent is a symlink or not a directory (symlinks are not followed)",
    errno.ENOTDIR: "a parent is a symlink or not a directory (symlinks are not followed)",
    errno.ENOENT: "a parent directory is missing",
    errno.ENOTEMPTY: "would replace a non-empty directory",
}


@contextmanager
def _archive_errors(path: bytes) -> Iterator[None]:
    """Turn OS errors that the archive's structure provokes into CpioFormatError naming ``path``."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _ARCHIVE_ERRNOS:
            raise
        reason = _REASONS.get(exc.errno, exc.strerror)
        raise CpioFormatError(f"cannot extract {path!r}: {reason}") from exc


class _Extractor:
    """Creates members one by one under ``root_fd`` and applies deferred metadata at the end."""

    def __init__(self, root_fd: int, preserve_owner: bool, ids: IdRange | None, strip: int = _SETID):
        self._root = root_fd
        self._preserve_owner = preserve_owner
        self._ids = ids
        self._strip = strip
        self._inodes: dict[tuple[int, int, int], _Inode] = {}
        self._inode_of_path: dict[bytes, _Inode] = {}
        self._dirs: dict[bytes, CpioMember] = {}
        self.report = UnpackReport()

    # -- path handling -----------------------------------------------------------------------

    @contextmanager
    def _parent(self, path: bytes) -> Iterator[tuple[int, bytes]]:
        """Yield ``(fd of the parent directory, last component)``, walking without following symlinks."""
        parent, _, name = path.rpartition(b"/")
        fd = self._root
        try:
            for component in parent.split(b"/") if parent else ():
                next_fd = os.open(component, _DIR_FLAGS, dir_fd=fd)
                if fd != self._root:
                    os.close(fd)
                fd = next_fd
            yield fd, name
        finally:
            if fd != self._root:
                os.close(fd)

    def _clear(self, parent_fd: int, name: bytes, path: bytes, keep_dir: bool) -> bool:
        """Remove whatever is at ``name`` (unless ``keep_dir`` and it is a directory), forgetting
        any deferred work recorded for ``path``.  Returns True if a directory was kept."""
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            os.rmdir(name, dir_fd=parent_fd)
            self._dirs.pop(path, None)
        else:
            os.unlink(name, dir_fd=parent_fd)
            inode = self._inode_of_path.pop(path, None)
            if inode is not None:
                inode.paths.remove(path)
        return False

    # -- members -----------------------------------------------------------------------------

    def extract(self, member: CpioMember, data: MemberData) -> None:
        """Create one member; archive-caused OS errors become CpioFormatError."""
        if (member.is_dir or member.is_file) and member.mode & self._strip:
            self.report.stripped_setid.append(member.path)
        with _archive_errors(member.path):
            if member.is_dir:
                self._make_dir(member)
            elif member.is_file:
                self._make_file(member, data)
            elif member.is_symlink:
                self._make_symlink(member)
            else:
                self.report.skipped_devices.append(member.path)

    def _make_dir(self, member: CpioMember) -> None:
        with self._parent(member.path) as (parent_fd, name):
            if not self._clear(parent_fd, name, member.path, keep_dir=True):
                os.mkdir(name, 0o700, dir_fd=parent_fd)
        self._dirs[member.path] = member
        self.report.dirs += 1

    def _make_symlink(self, member: CpioMember) -> None:
        with self._parent(member.path) as (parent_fd, name):
            self._clear(parent_fd, name, member.path, keep_dir=False)
            assert member.link_target is not None  # iter_archive reads every symlink's target
            os.symlink(member.link_target, name, dir_fd=parent_fd)
            if self._preserve_owner:
                os.chown(name, *self._owner(member), dir_fd=parent_fd, follow_symlinks=False)
            os.utime(name, (member.mtime, member.mtime), dir_fd=parent_fd, follow_symlinks=False)
        self.report.symlinks += 1

    def _make_file(self, member: CpioMember, data: MemberData) -> None:
        key = (*member.dev, member.ino) if member.nlink > 1 else None
        inode = self._inodes.get(key) if key is not None else None
        if inode is None:
            self._create_file(member, data, key)
        else:
            self._add_link(member, data, inode)

    def _create_file(self, member: CpioMember, data: MemberData, key: tuple[int, int, int] | None) -> None:
        with self._parent(member.path) as (parent_fd, name):
            self._clear(parent_fd, name, member.path, keep_dir=False)
            fd = os.open(name, _NEW_FILE_FLAGS, 0o600, dir_fd=parent_fd)
            try:
                _write_data(fd, data)
                if key is None:
                    self._apply_metadata(fd, member)
                else:
                    self._inodes[key] = self._inode_of_path[member.path] = _Inode([member.path], member)
            finally:
                os.close(fd)
        self.report.files += 1

    def _add_link(self, member: CpioMember, data: MemberData, inode: _Inode) -> None:
        if member.path not in inode.paths:
            self._link(member.path, inode)
            inode.paths.append(member.path)
            self._inode_of_path[member.path] = inode
            self.report.hardlinks += 1
        if data.remaining:
            with self._parent(member.path) as (parent_fd, name):
                fd = os.open(name, _REWRITE_FLAGS, dir_fd=parent_fd)
                try:
                    _write_data(fd, data)
                finally:
                    os.close(fd)
        inode.member = member

    def _link(self, path: bytes, inode: _Inode) -> None:
        """Make ``path`` a new link of ``inode`` through its first remaining path (like the kernel)."""
        if not inode.paths:
            raise CpioFormatError(f"cannot extract {path!r}: its hardlink source was removed or "
                                  "replaced by a later member")
        with self._parent(inode.paths[0]) as (source_fd, source_name), \
                self._parent(path) as (parent_fd, name):
            self._clear(parent_fd, name, path, keep_dir=False)
            os.link(source_name, name, src_dir_fd=source_fd, dst_dir_fd=parent_fd, follow_symlinks=False)

    # -- metadata ----------------------------------------------------------------------------

    def _owner(self, member: CpioMember) -> tuple[int, int]:
        """The host owner of ``member`` (shifted into the subordinate range, if any)."""
        if self._ids is None:
            return member.uid, member.gid
        if not (self._ids.contains(member.uid) and self._ids.contains(member.gid)):
            raise CpioFormatError(f"cannot extract {member.path!r}: owner {member.uid}:{member.gid} is outside the "
                                  f"{self._ids.count} ids mapped into the enclave (give the subordinate range more "
                                  "ids, or rebuild the image with smaller ids)")
        return self._ids.host_uid(member.uid), self._ids.host_gid(member.gid)

    def _apply_metadata(self, fd: int, member: CpioMember) -> None:
        """Owner (optional), mode without the stripped bits, then mtime, on an open file or directory."""
        if self._preserve_owner:
            os.fchown(fd, *self._owner(member))
        os.fchmod(fd, member.permissions & ~self._strip)
        os.utime(fd, (member.mtime, member.mtime))

    def finish(self) -> None:
        """Apply deferred metadata: hardlinked files, then directories deepest first."""
        for inode in self._inodes.values():
            if inode.paths:  # else every link was replaced by later members
                self._reapply_metadata(inode.paths[0], _REOPEN_FLAGS, inode.member)
        for path in sorted(self._dirs, reverse=True):  # a child sorts after its parent
            self._reapply_metadata(path, _DIR_FLAGS, self._dirs[path])

    def _reapply_metadata(self, path: bytes, flags: int, member: CpioMember) -> None:
        with _archive_errors(path), self._parent(path) as (parent_fd, name):
            fd = os.open(name, flags, dir_fd=parent_fd)
            try:
                self._apply_metadata(fd, member)
            finally:
                os.close(fd)


def _write_data(fd: int, data: MemberData) -> None:
    for chunk in data:
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view):]
