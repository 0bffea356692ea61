"""Who may call a server, and who owns which VM (``--token-file``; docs/api.md#clients).

A token file holds one client per line: ``NAME TOKEN``, or a bare ``TOKEN`` for a client named
``default``; blank lines and lines starting with ``#`` are ignored. Every call but health
checks must carry ``authorization: Bearer <token>`` of one of them. A VM belongs to the client
that created (or imported) it: only that client sees it in ListVms, and any other client
naming it is refused with PERMISSION_DENIED (reason VM_NOT_OWNED). Without a token file every
caller is one anonymous client and owns every VM.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass

from mtrremu.core.errors import InvalidArgument

#: The client a bare token names, and every caller when there are no tokens.
DEFAULT_CLIENT = "default"
#: Client names appear in logs and snapshots: printable, bounded.
MAX_NAME = 64


@dataclass(frozen=True)
class Clients:
    """Client names by token."""

    by_token: dict[bytes, str]

    @classmethod
    def parse(cls, text: str, source: str) -> Clients:
        """The clients of a token file's ``text`` (``source`` names it in errors)."""
        by_token: dict[bytes, str] = {}
        names: set[str] = set()
        for number, line in enumerate(text.splitlines(), 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) > 2:
                raise InvalidArgument(f"{source}:{number}: expected NAME TOKEN or TOKEN")
            name, token = (DEFAULT_CLIENT, fields[0]) if len(fields) == 1 else fields
            if not (name.isprintable() and len(name) <= MAX_NAME):
                raise InvalidArgument(f"{source}:{number}: a client name of at most {MAX_NAME}")
            if name in names or token.encode() in by_token:
                raise InvalidArgument(f"{source}:{number}: client {name!r} or its token repeats")
            names.add(name)
            by_token[token.encode()] = name
        if not by_token:
            raise InvalidArgument(f"{source} holds no token")
        return cls(by_token)

    @classmethod
    def single(cls, token: str) -> Clients:
        """One client, ``default``, with ``token``."""
        return cls({token.encode(): DEFAULT_CLIENT})

    def client_of(self, metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
        """The client whose token the call's ``authorization`` header carries, if any. Every
        token is compared in constant time, so the answer's timing does not tell which one
        nearly matched."""
        given = dict(metadata).get("authorization", "")
        given_bytes = given.encode() if isinstance(given, str) else given
        found = None
        for token, name in self.by_token.items():
            if hmac.compare_digest(given_bytes, b"Bearer " + token):
                found = name
        return found
