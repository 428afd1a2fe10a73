"""Which requests of an extend batch run on the 8-bit kernel, decided per request.

A request whose new chunk is shorter than the crossover (measured against the
base backend, ``crossover.py``) runs on the base backend's kernel: decode rows of
MIXED batches, short chunks after a radix hit. Deciding per request (on the
request's own chunk length) keeps a request's path -- and its output bits --
independent of its batch neighbours, and keeps short requests' cached prefixes out
of the 8-bit pre-pass's workspace.

``split_requests`` runs once per batch, on the host lengths SGLang already
keeps (no device read). A ``RequestSubset`` is an extend batch of its own in
SGLang's calling convention; when it is only part of the batch, ``rows`` lists
its query rows, which a layer gathers before and scatters after its kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch


@dataclass
class RequestSubset:
    qo_indptr: torch.Tensor  # [n + 1] int32, over the subset's own rows
    kv_indptr: torch.Tensor  # [n + 1] int32, over ``kv_indices``
    kv_indices: torch.Tensor  # the subset's slots (per request: ``kv_lens``), request after request
    max_extend_len: int
    extend_lens: list[int]
    # [tokens] int64: the subset's rows of the batch's q/k/v/o; None = the whole batch.
    rows: torch.Tensor | None
    # [n] int64: the subset's requests, as indices into the batch's requests.
    requests: torch.Tensor
    kv_lens: list[int]

    @property
    def batch_size(self) -> int:
        return len(self.extend_lens)


def _ranges(starts: torch.Tensor, lens: list[int], device) -> torch.Tensor:
    """Concatenated ``arange(s, s + n)`` for each (start, len), built on the device."""
    total = sum(lens)
    lens_dev = torch.tensor(lens, dtype=torch.int64, device=device)
    offsets = torch.tensor([0, *accumulate(lens)][:-1], dtype=torch.int64, device=device)
    base = torch.repeat_interleave(starts.to(torch.int64) - offsets, lens_dev, output_size=total)
    return base + torch.arange(total, dtype=torch.int64, device=device)


def subset_of(
    picked: list[int],
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    extend_lens: list[int],
    kv_lens: list[int],
) -> RequestSubset | None:
    """Requests ``picked`` (each with rows) of a batch whose request b holds
    ``kv_lens[b]`` slots of ``kv_indices`` from ``kv_indptr[b]``, as an extend batch of
    their own; None when nothing is picked."""
    if not picked:
        return None
    device = qo_indptr.device
    sub_extend = [extend_lens[b] for b in picked]
    sub_kv = [kv_lens[b] for b in picked]
    index = torch.tensor(picked, dtype=torch.int64, device=device)
    if picked == list(range(len(extend_lens))):
        # Every request of the batch: its own metadata serves.
        return RequestSubset(
            qo_indptr=qo_indptr,
            kv_indptr=kv_indptr,
            kv_indices=kv_indices,
            max_extend_len=max(sub_extend),
            extend_lens=sub_extend,
            rows=None,
            requests=index,
            kv_lens=sub_kv,
        )

    def indptr(lens):
        return torch.tensor([0, *accumulate(lens)], dtype=torch.int32, device=device)

    slots = _ranges(kv_indptr[index], sub_kv, device)
    return RequestSubset(
        qo_indptr=indptr(sub_extend),
        kv_indptr=indptr(sub_kv),
        kv_indices=kv_indices[slots],
        max_extend_len=max(sub_extend),
        extend_lens=sub_extend,
        rows=_ranges(qo_indptr[index], sub_extend, device),
        requests=index,
        kv_lens=sub_kv,
    )


def takes_8bit(extend_len: int, min_extend_len: int | None) -> bool:
    """Whether a request with this new chunk runs on the 8-bit kernel (None: never)."""
    return min_extend_len is not None and extend_len > 0 and extend_len >= min_extend_len


def pick_requests(
    extend_lens: list[int], min_extend_len: int | None
) -> tuple[list[int], list[int]]:
    """(requests for the 8-bit kernel, the other requests with rows). Requests with an
    empty chunk go nowhere: they have no rows."""
    long_ones = [b for b, n in enumerate(extend_lens) if takes_8bit(n, min_extend_len)]
    taken = set(long_ones)
    short_ones = [b for b, n in enumerate(extend_lens) if n > 0 and b not in taken]
    return long_ones, short_ones


def split_requests(
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    extend_lens: list[int],
    prefix_lens: list[int],
    min_extend_len: int,
) -> tuple[RequestSubset | None, RequestSubset | None]:
    """(requests for the 8-bit kernel, requests for the base's kernel); either may be None.

    A request runs 8-bit when its chunk has at least ``min_extend_len`` tokens
    (and at least one). ``kv_indices`` hold the cached prefixes.
    """
    index = (qo_indptr, kv_indptr, kv_indices, extend_lens, prefix_lens)
    long_ones, short_ones = pick_requests(extend_lens, min_extend_len)
    return subset_of(long_ones, *index), subset_of(short_ones, *index)


def budget_groups(picked: list[int], kv_lens: list[int], budget: int) -> list[list[int]]:
    """``picked`` in runs of consecutive requests whose ``kv_lens`` sum to at most
    ``budget`` rows (a workspace's size); a request is never split, so one longer
    than the budget is an error."""
    groups: list[list[int]] = []
    total = budget + 1
    for b in picked:
        if kv_lens[b] > budget:
            raise ValueError(
                f"sage_attn: a request of {kv_lens[b]} tokens exceeds the {budget}-token workspace"
            )
        if total + kv_lens[b] > budget:
            groups.append([])
            total = 0
        groups[-1].append(b)
        total += kv_lens[b]
    return groups


def run_on_subset(subset: RequestSubset, inputs: tuple, out: torch.Tensor, kernel) -> None:
    """Run ``kernel(*inputs, out)`` on a subset's rows: in place for the whole batch,
    else on gathered rows whose output is scattered back."""
    if subset.rows is None:
        kernel(*inputs, out)
        return
    rows = subset.rows
    out_rows = out.new_empty((rows.shape[0], *out.shape[1:]))
    kernel(*(x[rows] for x in inputs), out_rows)
    out.index_copy_(0, rows, out_rows)
