"""Windows of a prompt: contiguous runs of visual tokens (a frame, or a token count) and the width each is stored
at, plus the checks that keep a window out of quantization (non-finite or beyond-fp16 values)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .quant import quantizable_tokens


def make_windows(spans: Sequence[tuple[int, int]], size: int) -> Windows:
    """Split visual spans ``(start, length)`` into windows of ``size`` tokens (the last of a span may be shorter).

    With ``size`` = tokens per frame (196 for LLaVA-OneVision video) a window is one frame.
    """
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"size: window size must be a positive int, got {size!r}")
    starts: list[int] = []
    lengths: list[int] = []
    for start, length in spans:
        if start < 0 or length < 0:
            raise ValueError(f"spans: negative start/length in {(start, length)}")
        for off in range(0, length, size):
            starts.append(start + off)
            lengths.append(min(size, length - off))
    return Windows(torch.tensor(starts, dtype=torch.long), torch.tensor(lengths, dtype=torch.long))


def unquantizable_windows(k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor
                          ) -> torch.Tensor:
    """``[W]`` bool: windows of ``k, v [Hkv, T, D]`` holding a NaN/inf or an element beyond the fp16 range.

    Such a window is stored dense at the model's dtype like a 16-bit window (attention then equals dense attention:
    NaN propagates, large values stay exact). One vectorized pass over the prompt plus a prefix sum.
    """
    return runs_holding(~quantizable_mask(k, v), starts, lengths)

def windows_holding(tokens: torch.Tensor, windows: "Windows") -> torch.Tensor:
    """``[W]`` bool: the windows holding any True of ``tokens [T]`` (e.g. ``~quantizable_mask(k, v)``)."""
    return runs_holding(tokens, windows.starts, windows.lengths)

def quantizable_mask(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[T]`` bool: token ``t`` of ``k, v [Hkv, T, D]`` is finite and within the fp16 range in every head."""
    return (quantizable_tokens(k) & quantizable_tokens(v)).all(0)

def runs_holding(bad: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``[W]`` bool: runs ``[starts, starts + lengths)`` holding any True of ``bad [T]`` (one prefix sum)."""
    cs = torch.cat([bad.new_zeros(1, dtype=torch.long), torch.cumsum(bad.long(), 0)])
    s, ln = starts.to(cs.device), lengths.to(cs.device)
    return (cs[s + ln] - cs[s]) > 0

@dataclass(frozen=True)
class Windows:
    """Windows of one sample: token runs ``[starts[i], starts[i] + lengths[i])`` of the prompt, and (once a search
    assigned them) the width ``bits[i]`` each is stored at (16: dense).

    The token indices derived from the windows (every windowed token's position and window, which tokens fill whole
    key groups, the start order) are computed once per object and device and then reused: a prompt's windows are
    the same at every layer, only ``bits`` changes, and :meth:`with_bits` keeps the derived indices. The index
    tensors handed out are those cached: read them, never modify them in place.
    """

    starts: torch.Tensor  # [W] long
    lengths: torch.Tensor  # [W] long
    bits: torch.Tensor | None = None  # [W] long, in {16, 8, 4, 2}; None before the search
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.starts.numel())

    def with_bits(self, bits: torch.Tensor) -> "Windows":
        """The same windows stored at ``bits [W]``: the derived token indices are shared with this object (one
        cache for both), so what any layer derives is there for every later one."""
        out = Windows(self.starts, self.lengths, bits)
        object.__setattr__(out, "_derived", self._derived)  # one cache: nothing in it depends on bits
        return out

    def _cached(self, key: tuple, make: Callable[[], object]) -> Any:
        if key not in self._derived:
            self._derived[key] = make()
        return self._derived[key]

    def token_index(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(positions, window_id)`` of every windowed token, both ``[sum(lengths)]``, window-major."""
        dev = torch.device(device) if device is not None else self.starts.device

        def make() -> tuple[torch.Tensor, torch.Tensor]:
            starts, lengths = self.starts.to(dev), self.lengths.to(dev)
            wid = torch.repeat_interleave(torch.arange(len(self), device=dev), lengths)
            first = torch.repeat_interleave(starts - torch.cumsum(lengths, 0) + lengths, lengths)
            pos = first + torch.arange(int(self.lengths.sum()), device=dev)
            return pos, wid

        return self._cached(("token_index", dev), make)

    def whole_groups(self, k_group: int, device: torch.device | str | None = None) -> torch.Tensor:
        """``[sum(lengths)]`` bool over :meth:`token_index`: the token lies in a whole key group of its window
        (what a bucket quantizes; the tail of a window stays fp16)."""
        dev = torch.device(device) if device is not None else self.starts.device

        def make() -> torch.Tensor:
            pos, wid = self.token_index(dev)
            starts, lengths = self.starts.to(dev), self.lengths.to(dev)
            return (pos - starts[wid]) < (lengths // k_group * k_group)[wid]

        return self._cached(("whole_groups", k_group, dev), make)

    def whole_positions(self, k_group: int, device: torch.device | str | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(positions, window_id)`` of the tokens in whole key groups, window-major."""
        dev = torch.device(device) if device is not None else self.starts.device

        def make() -> tuple[torch.Tensor, torch.Tensor]:
            pos, wid = self.token_index(dev)
            keep = self.whole_groups(k_group, dev)
            return pos[keep], wid[keep]

        return self._cached(("whole_positions", k_group, dev), make)

    def prompt_order(self, k_group: int, device: torch.device | str | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(positions, window_id, whole)`` of every windowed token in prompt order (windows sorted by start);
        ``whole`` as in :meth:`whole_groups`."""
        dev = torch.device(device) if device is not None else self.starts.device

        def make() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            pos, wid = self.token_index(dev)
            whole = self.whole_groups(k_group, dev)
            if len(self) < 2 or bool((self.starts[1:] >= self.starts[:-1]).all()):
                return pos, wid, whole
            order = torch.argsort(pos, stable=True)
            return pos[order], wid[order], whole[order]

        return self._cached(("prompt_order", k_group, dev), make)

    def whole_run_start(self, k_group: int, device: torch.device | str | None = None) -> int | None:
        """The first position when the whole-group tokens (:meth:`whole_positions`) are one run of consecutive
        positions (back-to-back frames of a video), else None: callers slice instead of gathering."""
        dev = torch.device(device) if device is not None else self.starts.device

        def make() -> int | None:
            pos = self.whole_positions(k_group, dev)[0]
            if pos.numel() == 0:
                return None
            first = int(pos[0])
            return first if int(pos[-1]) - first + 1 == pos.numel() and bool((pos.diff() == 1).all()) else None

        return self._cached(("whole_run_start", k_group, dev), make)

    def check_disjoint(self, tokens: int) -> None:
        """Raise ``ValueError`` unless the windows are disjoint runs inside a ``tokens``-token prompt (checked once)."""
        ok = self._derived.get(("disjoint", tokens))
        if ok is None:
            ends = self.starts + self.lengths
            srt = torch.argsort(self.starts)
            ok = not (int(self.starts.min()) < 0 or int(ends.max()) > tokens
                      or bool((self.starts[srt][1:] < ends[srt][:-1]).any()))
            self._derived[("disjoint", tokens)] = ok
        if not ok:
            raise ValueError(f"windows: must be disjoint runs inside the {tokens}-token prompt")

    def bucket_order(self) -> torch.Tensor:
        """Window indices grouped by width (wide first), original order inside a bucket."""
        if self.bits is None:
            raise ValueError("windows: no widths assigned (bits is None)")
        key = (16 - self.bits) * (int(self.starts.max()) + 1 if len(self.starts) else 1) + self.starts
        return torch.argsort(key, stable=True)

#: A prompt's windows with their widths: the same type as :class:`Windows` (kept as a name for callers).
WindowAssignment = Windows
