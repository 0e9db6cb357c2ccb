"""Token log-probabilities from an in-process llama.cpp generation.

llama-cpp-python computes ``logprobs`` only for a model created with ``logits_all=True``, which keeps
a logits row per context position: 4096 x 49152 floats (800 MB) for SmolLM2 at ``n_ctx=4096``.
:class:`LogprobRecorder` gets them without that: it is a logits processor (first in the sampler
chain, so it sees the model's raw logits) that turns each step's logits into log-probabilities and
pairs them with the token the sampler chose, read from the context on the next step. The last
token is matched against the returned text when the generation ends.

The reported log-probabilities are the model's own distribution, before repetition penalties and
grammar constraints: with a grammar that forces the output (e.g. one allowed answer), their sum is
the model's log-likelihood of that output.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from dspy.lm15 import TokenLogprob, TopLogprob

__all__ = ["LogprobRecorder"]

_LAST_TOKEN_SEARCH = 64  # alternatives searched for the final token's text


class LogprobRecorder:
    """Collects per-token log-probabilities of one generation (pass as a ``logits_processor``).

    Args:
        llama: The ``Llama`` generating (used to turn token ids into text).
        top: Alternatives reported per token (``TokenLogprob.top``); 0 for none.
    """

    def __init__(self, llama: Any, top: int = 0) -> None:
        if top < 0:
            raise ValueError(f"top must be >= 0, got {top}")
        self.llama = llama
        self.top = top
        self.start: int | None = None
        self.entries: list[TokenLogprob] = []
        self._pending: npt.NDArray[np.float32] | None = None

    def __call__(self, input_ids: npt.NDArray[np.intc], logits: npt.NDArray[np.single]) -> Any:
        n = len(input_ids)
        if self.start is None:
            self.start = n
        elif self._pending is not None and n > self.start + len(self.entries):
            self.entries.append(self._entry(self._pending, int(input_ids[n - 1])))
        shifted = logits.astype(np.float32) - np.float32(logits.max())
        self._pending = shifted - np.float32(np.log(np.exp(shifted).sum()))
        return logits

    def finish(self, text: str) -> tuple[TokenLogprob, ...]:
        """The log-probabilities of the tokens making up ``text`` (the generation's output).

        Tokens past the returned text (an end-of-sequence token, a trimmed stop string) are not
        reported. The final token is found among the last step's most likely tokens by its text.
        """
        produced = text.encode("utf-8")
        entries: list[TokenLogprob] = []
        used = 0
        for entry in self.entries:
            piece = bytes(entry.bytes or ())
            if produced[used : used + len(piece)] != piece:
                break
            entries.append(entry)
            used += len(piece)
        rest = produced[used:]
        if rest and self._pending is not None and len(entries) == len(self.entries):
            last = self._find_token(self._pending, rest)
            if last is not None:
                entries.append(self._entry(self._pending, last))
        return tuple(entries)

    def _piece(self, token_id: int) -> bytes:
        piece: bytes = self.llama.detokenize([token_id], special=False)
        return piece

    def _find_token(self, row: npt.NDArray[np.float32], piece: bytes) -> int | None:
        k = min(_LAST_TOKEN_SEARCH, row.shape[0])
        best = np.argpartition(-row, k - 1)[:k]
        for token_id in best[np.argsort(-row[best], kind="stable")]:
            if self._piece(int(token_id)) == piece:
                return int(token_id)
        return None

    def _entry(self, row: npt.NDArray[np.float32], token_id: int) -> TokenLogprob:
        piece = self._piece(token_id)
        top: tuple[TopLogprob, ...] = ()
        if self.top:
            k = min(self.top, row.shape[0])
            best = np.argpartition(-row, k - 1)[:k]
            ranked = best[np.argsort(-row[best], kind="stable")]
            top = tuple(
                TopLogprob(
                    token=self._piece(int(t)).decode("utf-8", errors="replace"),
                    logprob=float(row[t]),
                    bytes=tuple(self._piece(int(t))),
                    token_id=int(t),
                )
                for t in ranked
            )
        return TokenLogprob(
            token=piece.decode("utf-8", errors="replace"),
            logprob=float(row[token_id]),
            bytes=tuple(piece),
            token_id=token_id,
            top=top,
        )
