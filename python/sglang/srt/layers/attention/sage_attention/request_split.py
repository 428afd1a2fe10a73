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
    kv_indices: torch.Tensor  # the subset's cached-prefix slots, request after request
    max_extend_len: int
    extend_lens: list[int]
    # [tokens] int64: the subset's rows of the batch's q/k/v/o; None = the whole batch.
    rows: torch.Tensor | None
    # [n] int64: the subset's requests, as indices into the batch's requests.
    requests: torch.Tensor

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


def _subset(
    picked: list[int],
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    extend_lens: list[int],
    prefix_lens: list[int],
    whole_batch: bool,
) -> RequestSubset:
    device = qo_indptr.device
    sub_extend = [extend_lens[b] for b in picked]
    sub_prefix = [prefix_lens[b] for b in picked]
    index = torch.tensor(picked, dtype=torch.int64, device=device)
    if whole_batch:
        return RequestSubset(
            qo_indptr=qo_indptr,
            kv_indptr=kv_indptr,
            kv_indices=kv_indices,
            max_extend_len=max(sub_extend),
            extend_lens=sub_extend,
            rows=None,
            requests=index,
        )

    def indptr(lens):
        return torch.tensor([0, *accumulate(lens)], dtype=torch.int32, device=device)

    prefix_slots = _ranges(kv_indptr[index], sub_prefix, device)
    return RequestSubset(
        qo_indptr=indptr(sub_extend),
        kv_indptr=indptr(sub_prefix),
        kv_indices=kv_indices[prefix_slots],
        max_extend_len=max(sub_extend),
        extend_lens=sub_extend,
        rows=_ranges(qo_indptr[index], sub_extend, device),
        requests=index,
    )


def takes_8bit(extend_len: int, min_extend_len: int) -> bool:
    """Whether a request with this new chunk runs on the 8-bit kernel."""
    return extend_len > 0 and extend_len >= min_extend_len


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
    (and at least one). Requests with an empty chunk go nowhere: they have no rows.
    """
    long_ones = [b for b, n in enumerate(extend_lens) if takes_8bit(n, min_extend_len)]
    short_ones = [b for b, n in enumerate(extend_lens) if 0 < n < min_extend_len]
    # The whole batch's metadata serves a side that holds every request with rows.
    with_rows = len(long_ones) + len(short_ones)
    sides = []
    for picked in (long_ones, short_ones):
        if not picked:
            sides.append(None)
            continue
        whole = len(picked) == with_rows and with_rows == len(extend_lens)
        sides.append(
            _subset(picked, qo_indptr, kv_indptr, kv_indices, extend_lens, prefix_lens, whole)
        )
    return sides[0], sides[1]


def run_on_subset(subset: RequestSubset, qkvo, kernel) -> None:
    """Run ``kernel(q, k, v, o)`` on a subset's rows: in place for the whole batch,
    else on gathered rows whose output is scattered back."""
    q, k, v, o = qkvo
    if subset.rows is None:
        kernel(q, k, v, o)
        return
    rows = subset.rows
    o_rows = o.new_empty((rows.shape[0], *o.shape[1:]))
    kernel(q[rows], k[rows], v[rows], o_rows)
    o.index_copy_(0, rows, o_rows)
