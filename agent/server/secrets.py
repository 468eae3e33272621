"""Secrets and private sockets of the servers: credentials, token files, redacted access logs,
Unix sockets no other user can reach or take.

- `Credentials`: the bearer tokens a server accepts, each a tenant of its own. `serve-model`
  scopes conversation keys to the tenant whose token created them (`agent.server.model_server`).
- `read_token_file`: one token per line (`#` comments and blank lines skipped), so a token never
  has to be on a command line, where `ps` shows it to every user of the machine.
- `RedactSecrets`: a logging filter on `aiohttp.access` that replaces `?token=…` (and a logged
  `Authorization` header) by `[redacted]`: `-v` logs every request line.
- `private_socket`: checks before binding a Unix socket: its directory is ours and no one else
  can write it (created 0700 when missing), the path is not someone else's; the socket is then
  created 0600 (`bind_private`).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import re
import stat
import tempfile
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

LOCAL_TENANT = "local"  # no token configured: every client is the same one (a Unix socket, loopback)
_QUERY_SECRET = re.compile(r"([?&](?:token|access_token|api_key|key)=)[^&\s\"']*", re.I)
_BEARER = re.compile(r"(Bearer\s+)[^\s\"']+", re.I)


class SecretError(Exception):
    """A secret or socket that must not be used; the message says why and what to do."""


class Credentials:
    """The tokens a server accepts. Each token is its own tenant, named by a digest of it (the
    token itself is never kept in a name, a log line or a key)."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self._tokens = [(t.encode(), tenant_of(t)) for t in dict.fromkeys(tokens) if t]

    def __bool__(self) -> bool:
        return bool(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def tenant(self, given: str) -> str | None:
        """The tenant of a presented token, or None. Every token is compared (constant time
        each), so the time taken does not tell which one nearly matched."""
        raw = given.encode("utf-8", "surrogatepass")
        found = None
        for token, tenant in self._tokens:
            if hmac.compare_digest(raw, token) and found is None:
                found = tenant
        return found


def tenant_of(token: str) -> str:
    return "t" + hashlib.sha256(b"voice-agent tenant\0" + token.encode()).hexdigest()[:16]


def read_token_file(path: str | os.PathLike[str]) -> list[str]:
    """The tokens in a file, one per line. A file others may read is used, with a warning."""
    p = Path(path).expanduser()
    try:
        mode = p.stat().st_mode
        text = p.read_text()
    except OSError as exc:
        raise SecretError(f"token file {p}: {exc.strerror or exc}") from None
    if mode & 0o077:
        log.warning("token file %s can be read by other users (mode %o): chmod 600 it", p, stat.S_IMODE(mode))
    tokens = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not tokens:
        raise SecretError(f"token file {p} holds no token (one per line)")
    return tokens


# ---- access logs --------------------------------------------------------------------------
def redact(text: str) -> str:
    return _BEARER.sub(r"\1[redacted]", _QUERY_SECRET.sub(r"\1[redacted]", text))


class RedactSecrets(logging.Filter):
    """Tokens out of access-log lines: the message and the request line aiohttp passes along."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        line = getattr(record, "first_request_line", None)
        if isinstance(line, str):
            record.first_request_line = redact(line)
        return True


def redact_access_log() -> None:
    """Install `RedactSecrets` on aiohttp's access logger (once per process)."""
    logger = logging.getLogger("aiohttp.access")
    if not any(isinstance(f, RedactSecrets) for f in logger.filters):
        logger.addFilter(RedactSecrets())


# ---- Unix sockets --------------------------------------------------------------------------
def private_socket(path: str) -> None:
    """Refuse (SecretError) a socket path another user owns or could replace; create its
    directory 0700 when missing. A stale socket of ours stays for the caller to remove."""
    target = Path(os.path.abspath(path))
    folder = target.parent
    if not folder.exists():
        try:
            folder.mkdir(mode=0o700, parents=True)
            os.chmod(folder, 0o700)  # mkdir's mode passes through the umask
        except OSError as exc:
            raise SecretError(f"cannot create {folder}: {exc.strerror or exc}") from None
    st = os.stat(folder)
    if not stat.S_ISDIR(st.st_mode):
        raise SecretError(f"{folder} is not a directory")
    if st.st_uid != os.getuid():
        raise SecretError(f"{folder} belongs to another user (uid {st.st_uid}): put the socket in a "
                          "directory of your own, e.g. $XDG_RUNTIME_DIR or ~/.cache/voice-agent (0700)")
    if st.st_mode & 0o022:
        raise SecretError(f"{folder} can be written by other users (mode {stat.S_IMODE(st.st_mode):o}): they could "
                          "replace the socket; put it in a private directory (0700), not directly in /tmp")
    try:
        own = os.lstat(target)
    except FileNotFoundError:
        return
    if own.st_uid != os.getuid():
        raise SecretError(f"{target} belongs to another user (uid {own.st_uid}): refusing to use it")
    if not stat.S_ISSOCK(own.st_mode):
        raise SecretError(f"{target} exists and is not a socket: refusing to replace it")


async def bind_private(path: str, bind: Callable[[], Awaitable[T]]) -> T:
    """Run `bind` (which creates the socket at `path`) with a umask that makes it 0600, then
    make sure of it. The umask is process-wide: this runs at start-up, before any thread."""
    old = os.umask(0o177)
    try:
        result = await bind()
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return result


def run_dir(prefix: str = "voice-agent-") -> str:
    """A fresh private directory (0700, ours) for a supervisor's sockets: under
    $XDG_RUNTIME_DIR when that is a private directory of ours, else the temporary directory
    (mkdtemp: a new name, 0700, never one another user made first)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    parent: str | None = None
    if base:
        with contextlib.suppress(OSError):
            st = os.stat(base)
            if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077:
                parent = base
    return tempfile.mkdtemp(prefix=prefix, dir=parent)

