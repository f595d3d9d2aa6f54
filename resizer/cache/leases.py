"""Cross-process leases on a disk cache's partial entries.

Several processes (hypercorn workers, or instances on one host) share a disk cache. Each has
its own coalescing registry, so without help two of them would transcode the same key at
once. A lease makes one of them the *leader*; the others *follow* it by tailing its partial
file, exactly as local joiners tail a local Work's spool.

The protocol uses ``flock`` locks, which the kernel drops when a process dies, so a crash
never leaves a key locked:

``tmp/<digest>.lock``
    The leader holds an exclusive lock on it and writes the name of its partial data file
    into it (the *announcement*). It unlinks the lock file before releasing the lock, so a
    process that opened the old file sees, after locking, that the path now names another
    file, and starts over (the classic lock-file pattern).
``tmp/<digest>.<token>.data``
    The leader's partial entry. Every follower holds a *shared* lock on its own descriptor of
    it; that is how the leader knows others still need the output after its own clients left.
    A leader that finds no follower takes an exclusive lock on it and keeps it while it
    abandons the work, so no follower can start reading a file that is about to vanish.

Followers poll (``poll_interval``): the file's size is their progress, and the lock file
becoming free tells them the leader ended; the cache lookup then says whether it published.

The lease is also the key's lock against clean-up: every commit publishes under it (the
leader's, or one ``claim``ed for the two renames), and ``prepare()`` decides about a key's
files only under a claim, so it never sees a half-published entry. A process following a
claim sees no announcement, then the lease end, and looks the entry up like after any leader.

Every function here is synchronous and non-blocking (``LOCK_NB``): a few syscalls on a local
filesystem, called from trio tasks without threads so that no cancellation can land between
taking a lock and recording that we hold it.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from ..options import key_digest

_LOCK_SUFFIX = ".lock"


def _try_lock(fd: int, operation: int) -> bool:
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _read_announcement(fd: int) -> str:
    return os.pread(fd, 512, 0).decode("ascii", "replace").strip()


class Lead:
    """This process holds a key's lease: it produces the key (other processes may follow its
    partial file) or, when ``claim`` gave it, publishes or tidies the key's files."""

    def __init__(
        self, tmp_dir: Path, lock_path: Path, lock_fd: int, leading: set[Path] | None = None
    ) -> None:
        self._tmp_dir = tmp_dir
        self._lock_path = lock_path
        self._lock_fd = lock_fd
        self._leading = leading  # the board's record of the leases acquire() gave out
        if leading is not None:
            leading.add(lock_path)
        self._probe_fd = -1  # our own descriptor of the partial file, for follower checks
        self._claimed = False

    def announce(self, partial: Path) -> None:
        """Publish the partial file's name so that followers can find and tail it."""
        assert partial.parent == self._tmp_dir
        self._probe_fd = os.open(partial, os.O_RDONLY | os.O_CLOEXEC)
        name = partial.name.encode("ascii")
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, name, 0)

    def followed(self) -> bool:
        """True while another process tails the partial file.

        When it returns False the answer is final: the partial is claimed, so no follower can
        start reading it, and the caller is expected to abandon the work.
        """
        if self._probe_fd < 0 or self._claimed:
            return False
        if _try_lock(self._probe_fd, fcntl.LOCK_EX):
            self._claimed = True
            return False
        return True

    def release(self) -> None:
        """End the lease (after publishing or abandoning). Idempotent."""
        if self._lock_fd < 0:
            return
        # Unlink first, while locked: whoever opened this file meanwhile sees it is stale.
        self._lock_path.unlink(missing_ok=True)
        os.close(self._lock_fd)
        self._lock_fd = -1
        if self._leading is not None:
            self._leading.discard(self._lock_path)
        if self._probe_fd >= 0:
            os.close(self._probe_fd)
            self._probe_fd = -1


@dataclass(frozen=True, slots=True)
class Tail:
    """What a follower sees at one poll."""

    size: int  # bytes of the leader's partial file so far
    leader_alive: bool


class FollowLost(Exception):
    """The followed partial file is not the leader's current one (only after a crash)."""


class Follow:
    """Another process leads ``key``; this tails its partial file."""

    def __init__(self, lock_path: Path, lock_fd: int) -> None:
        self._lock_path = lock_path
        self._lock_fd = lock_fd
        self._partial_name = ""
        self._partial_fd = -1

    @property
    def attached(self) -> bool:
        """Whether the leader's partial file is open (and share-locked) yet."""
        return self._partial_fd >= 0

    def partial_fd(self) -> int:
        """A new descriptor of the followed partial file (the caller closes it)."""
        assert self._partial_fd >= 0
        return os.dup(self._partial_fd)

    def poll(self) -> Tail:
        """One look at the leader: how much it wrote, and whether it still holds the lease.

        Raises ``FollowLost`` if the leader now announces another partial file than the one
        this follower tails (a leader died and another took over).
        """
        if _try_lock(self._lock_fd, fcntl.LOCK_EX):
            # The leader ended (it publishes before it releases), or died.
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            size = os.fstat(self._partial_fd).st_size if self._partial_fd >= 0 else 0
            return Tail(size, leader_alive=False)
        announced = _read_announcement(self._lock_fd)
        if self._partial_fd < 0:
            self._attach(announced)
        elif announced != self._partial_name:
            raise FollowLost(f"the leader now writes {announced!r}")
        size = os.fstat(self._partial_fd).st_size if self._partial_fd >= 0 else 0
        return Tail(size, leader_alive=True)

    def _attach(self, announced: str) -> None:
        if not announced:
            return  # the leader has not created its partial file yet
        try:
            fd = os.open(self._lock_path.parent / announced, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return  # stale announcement of a dead leader; the new one rewrites it
        # Shared lock before reading a byte: the leader then knows it is followed. Failing,
        # the leader is abandoning the file: wait for it to end, then take over.
        if not _try_lock(fd, fcntl.LOCK_SH) or _read_announcement(self._lock_fd) != announced:
            os.close(fd)
            return
        self._partial_name, self._partial_fd = announced, fd

    def release(self) -> None:
        """Stop following. Idempotent."""
        for fd in (self._partial_fd, self._lock_fd):
            if fd >= 0:
                os.close(fd)
        self._partial_fd = self._lock_fd = -1


class LeaseBoard:
    """Where the processes sharing one disk cache agree on who produces which key."""

    def __init__(self, tmp_dir: Path) -> None:
        self._tmp_dir = tmp_dir
        self._leading: set[Path] = set()  # lock files of the keys this process leads

    def lock_path(self, key: str) -> Path:
        return self.lock_path_of(key_digest(key))

    def lock_path_of(self, digest: str) -> Path:
        return self._tmp_dir / f"{digest}{_LOCK_SUFFIX}"

    def acquire(self, key: str) -> Lead | Follow:
        """Lead ``key`` if no other process does, else follow the one that does."""
        path = self.lock_path(key)
        taken = self._take(path, self._leading)
        return taken if isinstance(taken, Lead) else Follow(path, taken)

    def claim(self, digest: str) -> Lead | None:
        """The lease of the key with this digest if nobody holds it, else None.

        For holding a key for a few syscalls (publishing, clean-up), never for producing it.
        """
        taken = self._take(self.lock_path_of(digest), None)
        if isinstance(taken, Lead):
            return taken
        os.close(taken)
        return None

    def leads(self, digest: str) -> bool:
        """Whether a Lead ``acquire()`` gave this process holds the key with this digest."""
        return self.lock_path_of(digest) in self._leading

    def _take(self, path: Path, leading: set[Path] | None) -> Lead | int:
        """The lease at ``path``; if someone holds it, a descriptor of the lock file instead."""
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                if not _try_lock(fd, fcntl.LOCK_EX):
                    return fd
                if not _same_file(fd, path):
                    os.close(fd)  # a leader released (and unlinked) it meanwhile: try again
                    continue
                self._remove_stale_partial(_read_announcement(fd))
                os.ftruncate(fd, 0)
                return Lead(self._tmp_dir, path, fd, leading)
            except BaseException:
                os.close(fd)
                raise

    def _remove_stale_partial(self, announced: str) -> None:
        """A previous leader died: its partial file (if any) is garbage."""
        if announced and "/" not in announced and announced.endswith(".data"):
            (self._tmp_dir / announced).unlink(missing_ok=True)
