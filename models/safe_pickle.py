"""One restricted unpickler for every pickle the project reads (verification .bin files, insightface's mean face).

Only the globals a caller names are resolved; any other global, and so any function call a pickle asks
for, is refused with the caller's error before it runs.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Mapping
from typing import IO, Any


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler whose find_class answers only from `allowed` ((module, name) -> object)."""

    def __init__(self, file: IO[bytes], allowed: Mapping[tuple[str, str], Any],
                 refuse: Callable[[str, str], Exception], **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.allowed, self.refuse = allowed, refuse

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise self.refuse(module, name) from None
