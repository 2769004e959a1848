"""A folder only this user can change, checked up its whole path and held open while it is used.

The snapshot ring holds a run's weights and its restart points: another user who could write
anywhere on its path could rename it away and put their own in its place, plant a slot the run
would resume from, or leave a link for it to write through. So a `PrivateFolder`

- accepts a path only when every folder above it is owned by root or this user and writable by no
  one else, unless sticky (as /dev/shm and /tmp are: there others cannot rename what is not theirs);
- is opened once, O_DIRECTORY|O_NOFOLLOW, and must be owned by this user, writable by no one else
  (one others may only read is made 0700, through the open descriptor);
- `check()`: the path still leads to the folder that was opened (device, inode, owner): before each
  commit and each read of the ring;
- `walk()`: every entry inside, by lstat, refusing links and anything another user owns;
- `create_mark(name)`: a file made O_CREAT|O_EXCL|O_NOFOLLOW inside it, never written through a link.

Every refusal is one line naming the folder, what is wrong and the way out: remove it, or choose
another folder (never "chmod it": what others planted would stay).
"""
from __future__ import annotations

import errno
import os
import pwd
import stat
from typing import Iterator, Optional


class NotPrivate(PermissionError):
    """A folder others could change (or already did); the message names it and what to do."""


class FolderReplaced(NotPrivate):
    """The path no longer leads to the folder that was opened."""


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _writable_by_others(st: os.stat_result) -> Optional[str]:
    if st.st_mode & 0o002:
        return "anyone"
    if st.st_mode & 0o020:
        return "its group"
    return None


def check_ancestors(path: str) -> None:
    """NotPrivate unless every folder above `path` (resolved) is owned by root or this user and,
    unless sticky, writable by no one else."""
    me = os.geteuid()
    parent = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    folders = [parent]
    while folders[-1] != os.path.dirname(folders[-1]):
        folders.append(os.path.dirname(folders[-1]))
    for folder in reversed(folders):
        st = os.lstat(folder)
        if st.st_uid not in (0, me):
            raise NotPrivate(f"{path} lies under {folder}, which belongs to {user_name(st.st_uid)}: they could move "
                             f"it away or put their own in its place; choose a folder of your own")
        who = _writable_by_others(st)
        if who and not st.st_mode & stat.S_ISVTX:
            raise NotPrivate(f"{path} lies under {folder}, which {who} can write (mode {stat.S_IMODE(st.st_mode):o}): "
                             f"they could move it away or put their own in its place; choose a folder only you can write")


class PrivateFolder:
    """An open folder of this user's that no one else can change (see the module's doc)."""

    def __init__(self, path: str, create: bool = True):
        self.path = os.path.abspath(path)
        self.me = os.geteuid()
        if create:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        check_ancestors(self.path)
        if create:
            try:
                os.mkdir(self.path, 0o700)
            except FileExistsError:
                pass
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                kind = "a link" if os.path.islink(self.path) else "not a folder"
                raise NotPrivate(f"{self.path} is {kind}, not a folder of {user_name(self.me)}'s: remove it, or choose "
                                 f"another folder") from None
            raise
        st = os.fstat(self.fd)
        try:
            if st.st_uid != self.me:
                raise NotPrivate(f"{self.path} belongs to {user_name(st.st_uid)}, not to {user_name(self.me)}: they "
                                 f"could read the weights or have planted their own; remove it, or choose another folder")
            who = _writable_by_others(st)
            if who:
                raise NotPrivate(f"{self.path} can be written by {who} (mode {stat.S_IMODE(st.st_mode):o}): what they "
                                 f"put there would be read as this run's; remove it, or choose another folder")
            if st.st_mode & 0o077:
                os.fchmod(self.fd, 0o700)
        except BaseException:
            self.close()
            raise
        self.dev, self.ino = st.st_dev, st.st_ino

    def check(self) -> None:
        """FolderReplaced unless the path still leads to the folder opened (same device, inode and owner)."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            raise FolderReplaced(f"{self.path} is gone (renamed away or removed) since this run opened it") from None
        if (st.st_dev, st.st_ino, st.st_uid) != (self.dev, self.ino, self.me) or not stat.S_ISDIR(st.st_mode):
            raise FolderReplaced(f"{self.path} is no longer the folder this run opened: it was replaced (owner now "
                                 f"{user_name(st.st_uid)}); refusing to use it")

    def walk(self, top: Optional[str] = None) -> Iterator[os.DirEntry]:
        """Every entry under the folder (or its sub-folder `top`), by lstat: NotPrivate for a link or
        anything another user owns."""
        for entry in os.scandir(top or self.path):
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                raise NotPrivate(f"{self.path} holds a link, {entry.path}: someone put it there to be written or "
                                 f"read through; remove the folder, or choose another")
            if st.st_uid != self.me:
                raise NotPrivate(f"{self.path} holds {entry.path}, which belongs to {user_name(st.st_uid)}: it may have "
                                 f"been planted; remove the folder, or choose another")
            yield entry
            if stat.S_ISDIR(st.st_mode):
                yield from self.walk(entry.path)

    def create_mark(self, name: str) -> None:
        """An empty file `name` in the folder, made here and now (FileExistsError if anything, a link
        included, is already there)."""
        os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=self.fd))

    def remove_mark(self, name: str) -> None:
        os.unlink(name, dir_fd=self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self):
        if hasattr(self, "fd"):
            self.close()
