"""CMAI as a registered `transformers` attention function, exact in prefill and cached decoding.

The function is registered once under ``ATTN_NAME`` with `AttentionInterface` (plus a mask function
with `AttentionMaskInterface`, without which padding would be silently dropped). A layer takes part
only if its attention module carries a ``_unclutter_cmai`` context (set by `apply`, removed by
`remove`); every other call is plain SDPA, so the same name can serve many models at once.

State. A decode step's focus score needs the head-averaged text->image rows of every earlier text
token of the same layer (Eq. 10), so each layer keeps them: (B, m, n) float32, text rows only.
Per-call facts (which cache positions are image keys, which new tokens are text) are computed
once per forward by a pre-hook on `LlavaModel` (see `CMAIState.begin`), because `generate()`
rejects unknown kwargs.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..cmai import row_quantile

ATTN_NAME = "unclutter_cmai"


def _materialized_sdpa_mask(*args, **kwargs):
    # CMAI edits the mask per row, so it must always exist (SDPA's is_causal shortcut returns None).
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Register the attention and mask functions (idempotent)."""
    AttentionInterface.register(ATTN_NAME, cmai_attention)
    AttentionMaskInterface.register(ATTN_NAME, _materialized_sdpa_mask)


@dataclass
class Chunk:
    """Facts about the tokens of the current forward call, shared by all layers."""

    past: int  # tokens already in the cache
    q_len: int
    start: int  # first row of the call that is a text query in some sample (q_len if none)
    new_text: torch.Tensor  # (B, q_len - start) bool: row is an inhibited text query
    dest: torch.Tensor  # (B, q_len - start) long: text ordinal of each new row
    prev_count: torch.Tensor  # (B,) text rows stored before this call
    prev_pos: torch.Tensor  # (B, max(prev_count)) cache positions of those rows


class CMAIState:
    """Per-model CMAI state across the forward calls of one (cached) generation."""

    def __init__(self, image_token_id: int, gammas: dict[int, float], focus: str, discount: float) -> None:
        self.image_token_id = image_token_id
        self.gammas = gammas
        self.focus = focus
        self.discount = discount
        self._cache_ref = None
        self.tracing = False  # record each call's last-row inhibition (for pictures; see `trace`)
        self.reset(0)

    def reset(self, batch: int, device: torch.device | None = None) -> None:
        self.batch = batch
        self.length = 0
        self.image_pos: torch.Tensor | None = None  # (B, n) cache positions of image keys
        self.first_image: torch.Tensor | None = None  # (B,) first image position, or a huge value
        self.text_pos = torch.zeros(batch, 0, dtype=torch.long, device=device)
        self.text_count = torch.zeros(batch, dtype=torch.long, device=device)
        self.rows: dict[int, torch.Tensor] = {}  # layer -> (B, capacity, n) float32
        self.chunk: Chunk | None = None
        # layer -> one (B, n) bool per forward call: the image keys inhibited for the call's last row,
        # i.e. for the query that predicts the next generated token (filled only while `tracing`).
        self.trace: dict[int, list[torch.Tensor]] = {}

    @property
    def allocated_bytes(self) -> int:
        """Bytes CMAI holds in memory (stored rows with their spare capacity, plus bookkeeping)."""
        tensors = [*self.rows.values(), self.text_pos, self.text_count]
        tensors += [t for t in (self.image_pos, self.first_image) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def begin(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, past_key_values) -> None:
        """Record which new tokens are image keys and which are text queries (called before each forward)."""
        bsz, q_len = input_ids.shape
        device = input_ids.device
        past = int(past_key_values.get_seq_length()) if past_key_values is not None else 0
        cache = past_key_values
        if past == 0:
            self.reset(bsz, device)
            self._cache_ref = weakref.ref(cache) if cache is not None else None
            if cache is not None:
                self._follow_reorders(cache)
        else:
            known = self._cache_ref() if self._cache_ref is not None else None
            if known is not cache or bsz != self.batch:
                raise RuntimeError(
                    "CMAI got a cache whose prefill it did not see (another generation's cache?). Run the "
                    "prefill through the model while unclutter is applied."
                )
            if past < self.length:  # the cache was cropped (assisted decoding): forget later rows
                self._crop(past)
            elif past > self.length:
                raise RuntimeError(f"CMAI state covers {self.length} tokens but the cache holds {past}.")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("CMAI supports 2D padding masks (batch, sequence); got a custom 4D mask.")
        valid = (
            attention_mask[:, past : past + q_len].bool()
            if attention_mask is not None
            else torch.ones(bsz, q_len, dtype=torch.bool, device=device)
        )
        is_image = input_ids == self.image_token_id
        positions = past + torch.arange(q_len, device=device)
        if past == 0:
            counts = is_image.sum(dim=1)
            n = int(counts.max().item())
            if bool(((counts != 0) & (counts != n)).any()):
                raise ValueError(
                    f"CMAI needs the same number of image tokens in every sample of a batch, got {counts.tolist()}."
                )
            order = torch.sort((~is_image).to(torch.int8), dim=1, stable=True).indices[:, :n]
            self.image_pos = torch.where(counts[:, None] > 0, order, 0)
            big = torch.full((bsz,), torch.iinfo(torch.long).max, dtype=torch.long, device=device)
            self.first_image = torch.where(counts > 0, self.image_pos[:, 0] if n else big, big)
        elif bool(is_image.any()):
            raise ValueError("CMAI expects every image token in the first forward call (the prefill).")
        text = valid & ~is_image & (positions[None, :] > self.first_image[:, None])
        cols = text.any(dim=0).nonzero()
        start = int(cols[0].item()) if cols.numel() else q_len
        new_text = text[:, start:]
        dest = self.text_count[:, None] + new_text.long().cumsum(dim=1) - 1
        prev_count = self.text_count.clone()
        prev_pos = self.text_pos[:, : int(prev_count.max().item()) if bsz else 0]
        self.chunk = Chunk(past, q_len, start, new_text, dest, prev_count, prev_pos)
        added = new_text.sum(dim=1)
        if bool(added.any()):
            need = int((self.text_count + added).max().item())
            if need > self.text_pos.shape[1]:
                grown = torch.zeros(bsz, max(need, 2 * self.text_pos.shape[1]), dtype=torch.long, device=device)
                grown[:, : self.text_pos.shape[1]] = self.text_pos
                self.text_pos = grown
            b, r = new_text.nonzero(as_tuple=True)
            self.text_pos[b, dest[b, r]] = positions[start + r]
            self.text_count = self.text_count + added
        self.length = past + q_len

    def adopt(self, cache) -> None:
        """Take the cache a prefill created internally (called after each forward with its output cache)."""
        if cache is not None and self._cache_ref is None and self.length and cache.get_seq_length() == self.length:
            self._cache_ref = weakref.ref(cache)
            self._follow_reorders(cache)

    def _follow_reorders(self, cache) -> None:
        """Beam search reorders the cache's batch rows in place; reorder CMAI's rows with it."""
        original = cache.reorder_cache
        state = weakref.ref(self)

        def reorder_cache(beam_idx: torch.Tensor) -> None:
            original(beam_idx)
            st = state()
            if st is not None and st._cache_ref is not None and st._cache_ref() is cache:
                st._reorder(beam_idx.to(st.text_pos.device))

        cache.reorder_cache = reorder_cache

    def _reorder(self, beam_idx: torch.Tensor) -> None:
        self.image_pos = self.image_pos.index_select(0, beam_idx)
        self.first_image = self.first_image.index_select(0, beam_idx)
        self.text_pos = self.text_pos.index_select(0, beam_idx)
        self.text_count = self.text_count.index_select(0, beam_idx)
        self.rows = {layer: rows.index_select(0, beam_idx) for layer, rows in self.rows.items()}

    def _crop(self, length: int) -> None:
        keep = (self.text_pos < length) & (
            torch.arange(self.text_pos.shape[1], device=self.text_pos.device)[None] < self.text_count[:, None]
        )
        self.text_count = keep.sum(dim=1)  # text rows are stored in position order
        self.length = length

    def store(self, layer: int, new_rows: torch.Tensor) -> None:
        """Append this call's text->image rows (B, q_new, n) for ``layer`` at their text ordinals."""
        ch = self.chunk
        rows = self.rows.get(layer)
        cap = self.text_pos.shape[1]
        if rows is None or rows.shape[1] < cap:
            grown = torch.zeros(self.batch, cap, new_rows.shape[-1], dtype=torch.float32, device=new_rows.device)
            if rows is not None:
                grown[:, : rows.shape[1]] = rows
            rows = self.rows[layer] = grown
        b, r = ch.new_text.nonzero(as_tuple=True)
        rows[b, ch.dest[b, r]] = new_rows[b, r]


def _head_mean_probs(query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor, scaling: float) -> torch.Tensor:
    """Head-averaged softmax attention (B, q, K) in float32, grouped-query aware.

    query: (B, H, q, D); key: (B, Hkv, K, D); allowed: (B, 1, q, K) bool.
    """
    bsz, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.float().reshape(bsz, kv_heads, (heads // kv_heads) * q_len, dim)
    logits = (grouped @ key.float().transpose(-1, -2)).reshape(bsz, heads, q_len, -1) * scaling
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.nan_to_num(logits.softmax(dim=-1), nan=0.0)  # fully masked rows (padding) -> 0
    return probs.mean(dim=1)


def _inhibited(state: CMAIState, layer: int, gamma: float, a: torch.Tensor) -> torch.Tensor:
    """(B, q_new, n) bool inhibition for the new text rows, from their head-averaged rows ``a`` (B, q_new, K)."""
    ch = state.chunk
    bsz, q_new, _ = a.shape
    img = state.image_pos
    n = img.shape[1]
    t2i = a.gather(2, img[:, None, :].expand(bsz, q_new, n)) * ch.new_text[..., None]
    focus = t2i.clone()
    if state.focus != "tia":
        q_ord = ch.dest.to(a.dtype)  # text ordinal of each query row (used by "discounted")
        prev = state.rows.get(layer)
        m_prev = ch.prev_pos.shape[1]
        if prev is not None and m_prev:
            prev_valid = torch.arange(m_prev, device=a.device)[None] < ch.prev_count[:, None]  # (B, m_prev)
            w_prev = _weights(state, a, ch.prev_pos, q_ord, torch.arange(m_prev, device=a.device).to(a.dtype))
            focus = focus + (w_prev * prev_valid[:, None, :]) @ prev[:, :m_prev]
        new_pos = ch.past + ch.start + torch.arange(q_new, device=a.device)
        w_new = _weights(state, a, new_pos.expand(bsz, q_new), q_ord, q_ord)
        strictly_before = torch.ones(q_new, q_new, dtype=torch.bool, device=a.device).tril(-1)
        w_new = w_new * (strictly_before[None] & ch.new_text[:, None, :])
        focus = focus + w_new @ t2i
    state.store(layer, t2i)
    return (focus < row_quantile(focus, gamma)) & ch.new_text[..., None]


def _weights(state: CMAIState, a: torch.Tensor, key_pos: torch.Tensor, q_ord: torch.Tensor, k_ord: torch.Tensor):
    """W[b, j, h]: how much text key h counts in query j's focus score (before validity masking)."""
    bsz, q_new, _ = a.shape
    if state.focus == "paper":  # the query's attention to that text token (Eq. 9-10)
        return a.gather(2, key_pos[:, None, :].expand(bsz, q_new, key_pos.shape[1]))
    k_ord = k_ord if k_ord.dim() == 2 else k_ord[None].expand(bsz, -1)
    if state.focus == "sum":
        return torch.ones(bsz, q_new, k_ord.shape[1], dtype=a.dtype, device=a.device)
    dist = (q_ord[:, :, None] - k_ord[:, None, :]).clamp_min(0)
    return state.discount**dist


def cmai_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA with CMAI's inhibition added to the mask of the module's layer (plain SDPA elsewhere)."""
    ctx = getattr(module, "_unclutter_cmai", None)
    state: CMAIState | None = ctx() if ctx is not None else None
    if state is None or state.chunk is None or state.image_pos is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    layer = module.layer_idx
    gamma = state.gammas.get(layer, 0.0)
    ch = state.chunk
    if gamma == 0.0 or ch.start >= ch.q_len or state.image_pos.shape[1] == 0:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    scaling = module.scaling if scaling is None else scaling
    bsz, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    if attention_mask is None:  # only when called outside the registered mask path: plain causal
        q_pos = ch.past + torch.arange(q_len, device=query.device)
        attention_mask = (torch.arange(kv_len, device=query.device)[None] <= q_pos[:, None])[None, None]
    allowed = attention_mask.expand(bsz, 1, q_len, kv_len)
    # autocast off: under bf16 mixed precision the matmuls below would drop to bf16 and shift the quantile
    with torch.no_grad(), torch.autocast(device_type=query.device.type, enabled=False):
        a = _head_mean_probs(query[:, :, ch.start :], key, allowed[:, :, ch.start :], scaling)
        inhibit = _inhibited(state, layer, gamma, a)  # (B, q_new, n)
        if state.tracing:
            state.trace.setdefault(layer, []).append(inhibit[:, -1].cpu())
        blocked = torch.zeros(bsz, q_len - ch.start, kv_len, dtype=torch.bool, device=query.device)
        n = state.image_pos.shape[1]
        blocked.scatter_(2, state.image_pos[:, None, :].expand(-1, q_len - ch.start, n), inhibit)
        mask = allowed.clone()
        mask[:, 0, ch.start :] &= ~blocked
    return sdpa_attention_forward(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)
