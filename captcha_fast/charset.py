"""Charset: the stable mapping between symbols and CTC class indices."""
from __future__ import annotations

from typing import Iterable, List, Sequence


class Charset:
    """Symbols in a fixed order; class 0 is the CTC blank and symbol i is class i + 1.

    The order is saved with every model, so a reloaded model decodes exactly as
    it was trained (never derive it from a Python set)."""

    def __init__(self, symbols: str):
        if not isinstance(symbols, str) or not symbols:
            raise ValueError(f"a charset needs at least one symbol, got {symbols!r}")
        repeated = sorted({s for s in symbols if symbols.count(s) > 1})
        if repeated:
            raise ValueError(f"charset symbols must be unique, repeated: {''.join(repeated)!r}")
        self.symbols = symbols
        self._index = {s: i + 1 for i, s in enumerate(symbols)}

    @classmethod
    def from_labels(cls, labels: Iterable[str]) -> "Charset":
        """The symbols used in `labels`, in sorted (code point) order."""
        return cls("".join(sorted(set("".join(labels)))))

    @property
    def num_classes(self) -> int:
        """Symbols plus the blank: the model's output size."""
        return len(self.symbols) + 1

    def __len__(self) -> int:
        return len(self.symbols)

    def __eq__(self, other) -> bool:
        return isinstance(other, Charset) and other.symbols == self.symbols

    def __hash__(self) -> int:
        return hash(self.symbols)

    def __repr__(self) -> str:
        return f"Charset({self.symbols!r})"

    def unknown(self, text: str) -> str:
        """The characters of `text` that are not in the charset, in order of appearance."""
        return "".join(dict.fromkeys(ch for ch in text if ch not in self._index))

    def encode(self, text: str) -> List[int]:
        """Class indices of `text`; ValueError naming any unknown character."""
        bad = self.unknown(text)
        if bad:
            raise ValueError(f"label {text!r} has characters outside the charset {self.symbols!r}: {bad!r}")
        return [self._index[ch] for ch in text]

    def decode(self, indices: Sequence[int]) -> str:
        """The string of class indices (blank and padding, i.e. <= 0, are skipped)."""
        return "".join(self.symbols[i - 1] for i in indices if i > 0)
