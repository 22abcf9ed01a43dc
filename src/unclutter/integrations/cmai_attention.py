"""CMAI inside any transformers language model, through the public attention interface.

Mechanism. `cmai_attention` is registered with `AttentionInterface` (plus a mask function with
`AttentionMaskInterface`, without which padding would be silently dropped). A layer takes part only
if its attention module carries a ``_unclutter_cmai`` context (set by `apply`, removed by `remove`);
every other call is plain SDPA, so the same name can serve many models at once.

State. A decode step's focus score needs the head-averaged text->image rows of every earlier text
token of the same layer (Eq. 10), so each layer keeps them: (B, m, n) float32, text rows only.
Per-call facts (which cache positions are image keys, which new tokens are text) are computed once
per forward by a pre-hook on the VLM (see `CMAIState.begin`), because `generate()` rejects unknown
kwargs.

Launches. At batch 1 on a GPU, eager decoding is bound by kernel launches and host syncs, not arithmetic
(`unclutter bench dispatch` counts both). So whatever depends only on where a layer's keys sit is built once
per forward call and shared by every layer with that layout (`CMAIState.layout`), quantile positions once per
generation (`CMAIState.quantile`), and no layer call copies a value to the host: rows that are not text are
stored in a spare slot instead of being located with ``nonzero``, and a one-token decode step keeps a host-side
upper bound of the stored rows instead of asking the device which of its tokens were text.

Fast path. In the common case (one contiguous image block shared by the batch, no padding, every row of the call
from its first text row on a text query; `Chunk.fast`) the host already knows, from the syncs the general path makes
anyway, what the general path computes on the device: `_fast_mask` takes the image keys and the text rows' weights
as slices, the quantile positions as host numbers, and an additive mask built once per call. Everything else
(padding, several images, a generated non-text token) takes `_general_mask`. Both are tested against the naive
reference, and one against the other (batch == single).

Positions. Image keys and text tokens are stored by absolute position. A layer's keys are the last
``kv_len`` positions of the sequence (a full-attention layer holds all of them; a sliding-window layer,
as in Gemma 3 or Mistral-style configs, holds only its window), so key index = position - (length - kv_len);
keys that left the window have attention 0 in this layer. A static cache (``cache_implementation="static"``)
hands a layer its whole fixed buffer until the buffer is full: more keys than tokens, position = key index,
the empty slots hidden by the layer's mask; a full static sliding window holds the last positions, as above.

Static cache. A static cache (``cache_implementation="static"``) hands a layer its whole fixed buffer: see Positions.
There, CMAI allocates at the prefill a text row for every token the cache has room for, and each decode step with a
text query takes `_static_decode_mask`: the general path's arithmetic in shapes fixed for the generation (all of the
rows' capacity, those not stored yet weighted 0; key offsets computed on the device), reading from the host only
values that stay the same from step to step. So ``generate``'s compile of the decode step (by itself on a GPU)
traces every layer, CMAI's included, into one graph that CUDA graphs replay; only the per-call bookkeeping
(`CMAIState.begin`, in the VLM's forward pre-hook, with its host reads) runs eagerly before it. Every other call runs
CMAI's masks eagerly (`_layer_mask`, a graph break per layer).

Never silent. Everything the mechanism relies on is checked where it is used: a layer called without
the pre-hook having run, a query or key count that does not match the state (a decode step whose cache
the pre-hook could not find, a future rename of the cache argument), a cache kind CMAI cannot follow.
Each raises `CMAIStateError` naming the transformers release.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import MethodType

import torch
from transformers import AttentionInterface
from transformers.cache_utils import StaticLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .._amp import autocast_disabled
from ..cmai import QuantilePlan, host_quantile_plan, planned_quantile, quantile_plan
from ..compat import TESTED, transformers_version

ATTN_NAME = "unclutter_cmai"


class CMAIStateError(RuntimeError):
    """CMAI's bookkeeping does not match what the model is doing: results would be wrong, so we stop."""

    def __init__(self, problem: str) -> None:
        super().__init__(
            f"{problem} (transformers {transformers_version()}; unclutter is tested on {TESTED[0]} to {TESTED[1]}). "
            "If you upgraded transformers, run `make compat` and report the failure; if you drive the model by "
            "hand, send every forward call (prefill and each decode step) through the model unclutter was applied to."
        )


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
    """Facts about the tokens of the current forward call, shared by all layers.

    Row capacities (``text_pos``, the stored rows) carry one spare slot at the end: rows of the call that are
    not text queries are written there, so that storing never needs the host to know which rows are text
    (no device sync per layer).
    """

    past: int  # tokens already in the cache
    q_len: int
    start: int  # first row of the call that may be a text query (q_len if none); 0 in a one-token decode step
    new_text: torch.Tensor  # (B, q_len - start) bool: row is an inhibited text query
    dest: torch.Tensor  # (B, q_len - start) long: text ordinal of each new row
    prev_pos: torch.Tensor  # (B, m_prev) positions of the text rows stored before this call (m_prev: an upper bound)
    prev_valid: torch.Tensor  # (B, m_prev) bool
    inhibitable: torch.Tensor  # (B, q_len - start, n) bool: a real image key and a text query
    not_image: torch.Tensor  # (B, 1, n) bool: padding of the image-key list (samples with fewer image tokens)
    store_index: torch.Tensor  # (B, q_len - start, n) long: each row's store slot (text ordinal or the spare one)
    # a call of the common case (one image block shared by the batch, no padding, every row from `start` on a
    # text query), where the host knows what the general path computes on the device: see `_fast_mask`
    fast: bool = False
    # the model was given 4D masks (a user's, or those `generate` builds ahead for a static cache), which may hide keys
    # besides causality and padding: a decode step never assumes its token sees every key (see `sees_everything`)
    mask_4d: bool = False
    length: torch.Tensor | None = None  # (0-dim long) tokens once this call is in the cache, on the device
    layouts: dict = field(default_factory=dict)  # (offset, kv_len, mask) -> Layout, see `CMAIState.layout`


@dataclass
class Layout:
    """Everything a layer's inhibition needs that depends only on where its keys sit (its key offset, key count
    and mask), computed once per forward call and shared by the layers with that layout (all full-attention
    layers share one): a layer call then runs only the arithmetic on its own attention."""

    # (a fast layout, `Chunk.fast`, leaves the general path's fields None except `disallowed`, and sets fast_*)
    mask: torch.Tensor | None  # the attention mask this layout was built for (kept alive: its id is a key)
    allowed: torch.Tensor | None  # (B, 1, q_len, kv_len) bool
    disallowed: torch.Tensor | None  # (B, 1, q_len - start, kv_len) bool
    # one gather from a layer's attention rows serves the image keys (A_t2i) and, for "paper", the earlier text rows
    # (their A_t2n weights): (B, q_new, n [+ m_prev]) key indices, and float32 factors (1 for a visible image key
    # and a text query; a text row's validity)
    gather_index: torch.Tensor | None
    gather_keep: torch.Tensor | None
    columns: torch.Tensor | None  # (B, q_new, n) long: image key index, or the spare column kv_len if not visible
    prev_gathered: bool  # gather_index holds the earlier text rows after the n image keys ("paper")
    prev_weight: torch.Tensor | None  # (B, q_new, m_prev) the earlier rows' weights where the attention is not needed
    # this call's own text rows (prefill): for "paper", the key index of its first new row (the new rows are the
    # layer's last q_new keys) and (B, 1, q_new) float32 column factors (a text row), W being `a`'s own columns,
    # strictly below the diagonal; for the other modes, None and the (B, q_new, q_new) weights themselves
    new_first: int | None
    new_weight: torch.Tensor | None
    # a fast call in a layer that sees the whole image block: the block's first key index; the layer's additive
    # mask (B, 1, q_len, kv_len) (0 or -inf); in a decode step, the earlier text rows' key indices (B, 1, m_prev)
    # ("paper"); in a prefill, the key index of the first text row, whose own keys weigh each other ("paper")
    fast_first: int | None = None
    fast_mask: torch.Tensor | None = None
    fast_prev_index: torch.Tensor | None = None
    fast_own: int | None = None


# what one generation's state is (everything `CMAIState.reset` sets, and the cache it follows)
GENERATION = (
    "batch", "length", "image_pos", "image_valid", "first_image", "pad", "text_pos", "text_count", "text_bound",
    "static", "static_tokens", "rows", "plans", "block", "unpadded", "rows_exact", "fast_plans", "fast_steps", "chunk",
    "trace", "_cache_ref",
)  # fmt: skip


class CMAIState:
    """Per-model CMAI state across the forward calls of one (cached) generation.

    media_token_ids: ids whose positions are image keys (image and video placeholders).
    structural_token_ids: ids that are neither image keys nor text queries (row/column tags,
        begin/end-of-image markers): never inhibited and not part of A_t2n (README, design choice 5).
    """

    def __init__(
        self,
        media_token_ids: Sequence[int],
        gammas: dict[int, float],
        focus: str,
        discount: float,
        structural_token_ids: Sequence[int] = (),
    ) -> None:
        self.media_token_ids = tuple(sorted(set(media_token_ids)))
        self.structural_token_ids = tuple(sorted(set(structural_token_ids) - set(self.media_token_ids)))
        self.gammas = gammas
        self.focus = focus
        self.discount = discount
        self._cache_ref = None
        self._id_tables: dict[tuple, torch.Tensor] = {}
        self.tracing = False  # record each call's last-row inhibition (for pictures; see `trace`)
        self.reset(0)

    def _stash(self) -> None:
        """Leave the current generation with its cache, which a conversation may continue from after other
        generations ran on the model (another user's turn, another thread's request): see `_resume`."""
        cache = self._cache_ref() if self._cache_ref is not None else None
        if cache is not None:
            cache._unclutter_cmai_generation = (weakref.ref(self), {k: vars(self)[k] for k in GENERATION})

    def _resume(self, cache) -> None:
        """Continue the generation ``cache`` was left with (`_stash`), leaving the current one with its own cache."""
        owner, saved = getattr(cache, "_unclutter_cmai_generation", (None, None))
        if owner is None or owner() is not self:
            return  # not a cache of this model's generations: `begin` refuses it
        self._stash()
        vars(self).update(saved)
        del cache._unclutter_cmai_generation  # it is the current generation again

    def reset(self, batch: int, device: torch.device | None = None) -> None:
        self.batch = batch
        self.length = 0
        self.image_pos: torch.Tensor | None = None  # (B, n) positions of image keys (0 where not valid)
        self.image_valid: torch.Tensor | None = None  # (B, n) bool: samples may have fewer image tokens
        self.first_image: torch.Tensor | None = None  # (B,) first image position, or a huge value
        self.pad = torch.zeros(batch, 0, dtype=torch.bool, device=device)  # (B, length) True = real token
        self.text_pos = torch.zeros(batch, 1, dtype=torch.long, device=device)  # (B, capacity + 1), see `Chunk`
        self.text_count = torch.zeros(batch, dtype=torch.long, device=device)
        # a host-side upper bound of max(text_count): decode steps add a row per sample without the host
        # learning whether the token was text (that would cost a device sync); exact after the prefill
        self.text_bound = 0
        self.static = False  # the cache keeps some layer's keys in a fixed buffer (see `key_offset`)
        # the tokens a static cache's full-attention buffers hold (0: not such a cache): text rows are allocated at the
        # prefill for every token the cache has room for, so that decode steps keep fixed shapes (`_static_decode_mask`)
        self.static_tokens = 0
        self.capturable = False  # this call is a decode step `_static_decode_mask` serves (set by `begin`)
        self._spare: dict = {}  # the last generation's buffers on the same static cache (`_zeros`)
        self.rows: dict[int, torch.Tensor] = {}  # layer -> (B, capacity + 1, n) float32
        self.plans: dict[float, QuantilePlan] = {}  # gamma -> where each row's quantile lies (fixed counts)
        # Host-side facts that let a call skip most bookkeeping (`Chunk.fast`), learned by the syncs the general
        # path makes anyway: every sample's image keys are the same contiguous positions (start, n);
        # no token so far is padding; every sample stored exactly `text_bound` rows (all of them valid).
        self.block: tuple[int, int] | None = None
        self.unpadded = True
        self.rows_exact = True
        self.fast_plans: dict[float, tuple[int, int, torch.Tensor]] = {}  # gamma -> (lower, upper, weight)
        self.fast_steps = 0  # forward calls (prefill, decode steps) of this generation that took the fast path
        self.chunk: Chunk | None = None
        # layer -> one (B, n) bool per forward call: the image keys inhibited for the call's last row,
        # i.e. for the query that predicts the next generated token (filled only while `tracing`).
        self.trace: dict[int, list[torch.Tensor]] = {}

    @property
    def num_image_tokens(self) -> torch.Tensor | None:
        """(B,) image keys per sample of the current generation."""
        return None if self.image_valid is None else self.image_valid.sum(dim=1)

    @property
    def allocated_bytes(self) -> int:
        """Bytes CMAI holds in memory (stored rows with their spare capacity, plus bookkeeping)."""
        tensors = [*self.rows.values(), self.text_pos, self.text_count, self.pad]
        tensors += [t for t in (self.image_pos, self.image_valid, self.first_image) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def begin(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache, media_inputs: bool = True
    ) -> None:
        """Record which new tokens are image keys and which are text queries (called before each forward).

        media_inputs: whether the call may bring image features (pixel values). Image keys come from the prefill; a
        media id in a later call without image features (a placeholder the model generated: random models do) is
        embedded as an ordinary token, and CMAI treats it like a structural marker: neither an image key nor a text
        query. A later call that brings image features with image tokens is refused.
        """
        if input_ids is None:
            raise ValueError("CMAI needs input_ids (not inputs_embeds) to locate the image tokens.")
        bsz, q_len = input_ids.shape
        device = input_ids.device
        static, static_tokens = _check_cache_kind(cache) if cache is not None else (False, 0)
        past = int(cache.get_seq_length()) if cache is not None else 0
        if static_tokens and past + q_len > static_tokens:
            # stock transformers fails here too, with an index error inside the cache (or, for a prompt longer than the
            # cache, CMAI's reading of the 4D mask did, blaming a transformers upgrade): say what is wrong instead
            raise ValueError(
                f"the static cache holds {static_tokens} tokens but this call would fill it to {past + q_len} "
                f"({past} cached + {q_len} new): make the cache larger (max_cache_len of at least the prompt plus "
                "max_new_tokens, plus a conversation's later turns)"
            )
        if past == 0:
            # a static cache that generate reset for this generation: the last one on it is over, and its fixed-address
            # buffers serve this one (CUDA graphs recorded on them stay valid; new addresses would record them again)
            ours = self._cache_ref is not None and self._cache_ref() is cache and self.static_tokens
            spare = {"text_pos": self.text_pos, **self.rows} if ours else {}
            if not ours:
                self._stash()
            self.reset(bsz, device)
            self._cache_ref = weakref.ref(cache) if cache is not None else None
            self.static, self.static_tokens, self._spare = static, static_tokens, spare
            if cache is not None:
                self._follow_reorders(cache)
        else:
            known = self._cache_ref() if self._cache_ref is not None else None
            if known is not cache:
                self._resume(cache)
                known = self._cache_ref() if self._cache_ref is not None else None
            if known is not cache or bsz != self.batch:
                raise CMAIStateError(
                    "CMAI got a cache whose prefill it did not see (another generation's cache?). Run the "
                    "prefill through the model while unclutter is applied"
                )
            if past < self.length:  # the cache was cropped (assisted decoding): forget later rows
                self._crop(past)
            elif past > self.length:
                raise CMAIStateError(f"CMAI state covers {self.length} tokens but the cache holds {past}")
        valid = _real_tokens(attention_mask, bsz, q_len, past, device)
        if past > 0 and not media_inputs:  # generated placeholders: no image features behind them (see above)
            is_structural = self._isin(input_ids, self.structural_token_ids + self.media_token_ids)
            is_image = torch.zeros_like(is_structural)
        else:
            is_image = self._isin(input_ids, self.media_token_ids)
            is_structural = self._isin(input_ids, self.structural_token_ids)
        positions = past + torch.arange(q_len, device=device)
        if past == 0:
            counts = is_image.sum(dim=1)
            n = int(counts.max().item()) if bsz else 0
            # image positions first (stable), padded per sample: samples may hold different image token counts
            order = torch.sort((~is_image).to(torch.int8), dim=1, stable=True).indices[:, :n]
            self.image_valid = torch.arange(n, device=device)[None, :] < counts[:, None]
            self.image_pos = torch.where(self.image_valid, order, 0)
            big = torch.full((bsz,), torch.iinfo(torch.long).max, dtype=torch.long, device=device)
            self.first_image = torch.where(counts > 0, self.image_pos[:, 0], big) if n else big
        text = valid & ~is_image & ~is_structural & (positions[None, :] > self.first_image[:, None])
        m_prev = self.text_bound
        fast = False
        if q_len == 1 and past > 0:
            # a decode step; its one device sync. A sample whose new token is not text is masked out by new_text
            # below; when every sample's token is text, nothing is padding and the image block is simple, the
            # layers take the fast path (`_fast_mask`)
            facts = torch.stack([is_image.any(), text.all(), text.any(), valid.all()]).tolist()
            has_image, all_text, any_text, all_valid = facts
            _no_image_after_prefill(has_image)
            start = 0 if any_text else q_len  # no text query in any sample: every layer is plain SDPA
            bound = m_prev + 1 if any_text else m_prev
            self.unpadded = self.unpadded and bool(all_valid)
            # the bound stays every sample's count if all samples stored a row, or none did
            self.rows_exact = self.rows_exact and (bool(all_text) or not any_text)
            fast = bool(all_text) and self.unpadded and self.rows_exact and self.block is not None
        elif not bsz:
            start, bound = q_len, m_prev
        elif past > 0:  # several tokens on top of a cache (assisted decoding): the general path from here on
            _no_image_after_prefill(bool(is_image.any()))
            start = int(_first_text_column(text))
            bound = m_prev + q_len - start
            self.rows_exact = self.unpadded = False
        else:  # the prefill: the first text column, the most and fewest text rows of a sample, whether any token
            # is padding, and where the image block starts if it is one contiguous run shared by all samples
            first = _first_text_column(text)
            per_sample = text.sum(dim=1)
            all_text = (text | (torch.arange(q_len, device=device) < first)).all()  # every row from `first` is text
            block = _block_start(self.image_pos, counts)
            facts = [first, per_sample.max(), per_sample.min(), valid.all(), all_text, block]
            start, most, least, all_valid, all_text, block_start = torch.stack([f.long() for f in facts]).tolist()
            bound = most
            self.unpadded, self.rows_exact = bool(all_valid), most == least
            self.block = (block_start, self.image_pos.shape[1]) if block_start >= 0 else None
            fast = bool(all_text) and self.unpadded and self.block is not None and start < q_len
        fast = fast and self.focus in ("paper", "tia")
        self.fast_steps += fast
        self.pad = torch.cat([self.pad[:, :past], valid], dim=1)
        new_text = text[:, start:]
        dest = self.text_count[:, None] + new_text.long().cumsum(dim=1) - 1
        prev_valid = torch.arange(m_prev, device=device)[None] < self.text_count[:, None]  # rows stored before
        capacity = self.text_pos.shape[1] - 1
        if bound > capacity:
            # room for 64 more decode steps (or half again as many rows): a generation of up to 64 tokens past the
            # prompt grows once, and spare rows stay a small part of the state (each growth copies every layer's rows);
            # on a static cache, room for a text row per token the cache has left: its decode steps keep fixed shapes
            # (`_static_decode_mask`), and image tokens take no row
            room = (
                bound + self.static_tokens - (past + q_len) if self.static_tokens else capacity + max(64, capacity // 2)
            )
            grown = self._zeros("text_pos", (bsz, max(bound, room) + 1), torch.long, device)
            grown[:, :capacity] = self.text_pos[:, :capacity]
            self.text_pos, capacity = grown, grown.shape[1] - 1
        slot = torch.where(new_text, dest, capacity)  # rows that are not text go to the spare slot
        self.text_pos.scatter_(1, slot, positions[start:].expand(bsz, -1))
        self.text_count = self.text_count + new_text.sum(dim=1)
        self.text_bound = bound
        inhibitable = self.image_valid[:, None, :] & new_text[..., None]
        prev_pos = self.text_pos[:, :m_prev]
        self.chunk = Chunk(
            past, q_len, start, new_text, dest, prev_pos, prev_valid, inhibitable,
            ~self.image_valid[:, None, :], slot[..., None].expand(-1, -1, self.image_valid.shape[1]), fast,
            mask_4d=attention_mask is not None and (isinstance(attention_mask, dict) or attention_mask.dim() == 4),
        )  # fmt: skip
        self.length = past + q_len
        # a decode step with a text query on a static cache whose rows never grow: every layer takes the fixed-shape
        # `_static_decode_mask`, which torch.compile traces into the step's graph (every value it reads from the host
        # is fixed for the generation; what it needs besides is made here, outside the graph)
        n = self.image_pos.shape[1]
        self.capturable = bool(past and q_len == 1 and start == 0 and n and self.static_tokens and not self.tracing)
        self.capturable = self.capturable and capacity - bound >= self.static_tokens - self.length  # never grows
        # every layer's rows span text_pos (rows grow only when a layer stores them, text_pos here)
        self.capturable = self.capturable and all(r.shape[1] == capacity + 1 for r in self.rows.values())
        if self.capturable:
            self.chunk.length = positions[-1] + 1  # (0-dim, on the device) where each layer's keys start follows
            for layer, gamma in self.gammas.items():
                if gamma and gamma not in self.plans:
                    self.plans[gamma] = quantile_plan(self.image_valid.sum(dim=1)[:, None, None], gamma, torch.float32)
                if gamma and layer not in self.rows:  # (a prefill without text queries stored none)
                    self.rows[layer] = self._zeros(layer, (bsz, capacity + 1, n), torch.float32, device)

    def _isin(self, ids: torch.Tensor, values: tuple[int, ...]) -> torch.Tensor:
        """(B, q) bool: which ``ids`` are among ``values`` (the id tensor is built once per device: a copy from
        the host per decode step would be one more transfer on an accelerator)."""
        if not values:
            return torch.zeros_like(ids, dtype=torch.bool)
        key = (values, ids.device, ids.dtype)
        table = self._id_tables.get(key)
        if table is None:
            with torch.inference_mode(False):  # kept across calls, some of which autograd may track
                table = self._id_tables[key] = torch.tensor(values, device=ids.device, dtype=ids.dtype)
        return torch.isin(ids, table)

    def adopt(self, cache) -> None:
        """Take the cache a prefill created internally (called after each forward with its output cache)."""
        if cache is not None and self._cache_ref is None and self.length and cache.get_seq_length() == self.length:
            self.static, self.static_tokens = _check_cache_kind(cache)
            self._cache_ref = weakref.ref(cache)
            self._follow_reorders(cache)

    def _follow_reorders(self, cache) -> None:
        """Beam search reorders the cache's batch rows in place; reorder CMAI's rows with it. The cache's
        ``reorder_cache`` is replaced (not wrapped) by one that follows the state of the cache's latest prefill: a
        cache object reused for another generation (``cache.reset()``) reordered the rows once per earlier
        generation when each wrapped the last, and a copy of the cache reorders itself, not this one."""
        cache._unclutter_cmai_state = weakref.ref(self)
        cache.reorder_cache = MethodType(_reorder_cache_following_cmai, cache)

    def _reorder(self, beam_idx: torch.Tensor) -> None:
        for name in ("image_pos", "image_valid", "first_image", "pad", "text_pos", "text_count"):
            setattr(self, name, getattr(self, name).index_select(0, beam_idx))
        self.rows = {layer: rows.index_select(0, beam_idx) for layer, rows in self.rows.items()}
        self.plans = {}  # image counts moved between rows (text_bound stays an upper bound)

    def _crop(self, length: int) -> None:
        keep = (self.text_pos < length) & (
            torch.arange(self.text_pos.shape[1], device=self.text_pos.device)[None] < self.text_count[:, None]
        )
        self.text_count = keep.sum(dim=1)  # text rows are stored in position order
        # text_bound stays a bound, and no sample holds more text rows than tokens: without the clamp, each rejected
        # candidate of speculative decoding raised it for good, growing text_pos past a static cache's capacity
        self.text_bound = min(self.text_bound, length)
        self.rows_exact = False
        self.pad = self.pad[:, :length]
        self.length = length

    def store(self, layer: int, new_rows: torch.Tensor, slot: int | None = None) -> None:
        """Store this call's text->image rows (B, q_new, n) for ``layer`` at their text ordinals (or, in a fast
        call, from ``slot`` on: every row is text, so the ordinals run on from every sample's count)."""
        rows = self.rows.get(layer)
        size = self.text_pos.shape[1]  # capacity + the spare slot
        if rows is None or rows.shape[1] < size:
            grown = self._zeros(layer, (self.batch, size, new_rows.shape[-1]), torch.float32, new_rows.device)
            if rows is not None:
                grown[:, : rows.shape[1] - 1] = rows[:, :-1]
            rows = self.rows[layer] = grown
        if slot is None:
            rows.scatter_(1, self.chunk.store_index, new_rows)
        else:
            rows[:, slot : slot + new_rows.shape[1]] = new_rows

    def _zeros(self, name: str | int, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        """A zero buffer for ``name`` (text_pos, or a layer's rows). On a static cache it lives at one address for the
        generation, marked for torch.compile (the decode steps update it in place: CUDA graphs use it where it is),
        and is the last generation's on the same cache where the shapes match (`begin`)."""
        spare = self._spare.pop(name, None)
        if spare is not None and spare.shape == shape and spare.dtype == dtype and spare.device == torch.device(device):
            return spare.zero_()
        buffer = torch.zeros(shape, dtype=dtype, device=device)
        if self.static_tokens and not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(buffer)
        return buffer

    def quantile(self, focus: torch.Tensor, gamma: float) -> torch.Tensor:
        """Each text row's gamma-quantile (B, q_new, 1) of ``focus`` over the sample's image keys (as
        `masked_row_quantile`, whose counting part is computed once per generation and gamma)."""
        plan = self.plans.get(gamma)
        if plan is None:
            plan = self.plans[gamma] = quantile_plan(self.image_valid.sum(dim=1)[:, None, None], gamma, focus.dtype)
        return planned_quantile(focus.masked_fill(self.chunk.not_image, float("inf")).sort(dim=-1).values, plan)

    def fast_plan(self, gamma: float, device) -> tuple[int, int, torch.Tensor]:
        """`quantile_plan` for the image block every sample shares, evaluated on the host once per gamma
        (`host_quantile_plan`): the lower and upper order statistic (0-based) and the interpolation weight (a 0-dim
        float32 on ``device``)."""
        plan = self.fast_plans.get(gamma)
        if plan is None:
            lower, upper, weight = host_quantile_plan(self.block[1], gamma)
            plan = self.fast_plans[gamma] = (lower, upper, torch.tensor(weight, dtype=torch.float32, device=device))
        return plan

    def layout(
        self, module, attention_mask, bsz: int, q_len: int, kv_len: int, offset: int, query, window: int | None
    ) -> Layout:
        """The call's `Layout` for a layer with these keys (built by the first such layer, then reused)."""
        ch = self.chunk
        key = (offset, kv_len, id(attention_mask) if attention_mask is not None else window)
        found = ch.layouts.get(key)
        if found is not None:
            return found
        device = query.device
        first = self.block[0] - offset if self.block is not None else -1
        if ch.fast and 0 <= first <= kv_len - self.block[1]:
            layout = None
            if q_len == 1 and (self.sees_everything(window, kv_len) or kv_len > self.length or ch.mask_4d):
                # decode: no key is masked, or only those the layer's mask hides (a static layer's empty slots after
                # the last token, a 4D mask's keys)
                m_prev = ch.prev_pos.shape[1]
                prev_index = (ch.prev_pos - offset)[:, None, :] if self.focus == "paper" and m_prev else None
                hidden = None
                additive = torch.zeros(bsz, 1, 1, kv_len, dtype=query.dtype, device=device)
                if not self.sees_everything(window, kv_len):
                    hidden = ~_allowed(self, window, attention_mask, bsz, q_len, kv_len, offset, device)
                    additive.masked_fill_(hidden, -math.inf)
                layout = _fast_layout(attention_mask, hidden, first, additive, prev_index=prev_index)
            elif ch.past == 0 and offset == 0:  # prefill: the layer's own mask, as an additive one
                hidden = ~_allowed(self, window, attention_mask, bsz, q_len, kv_len, offset, device)
                additive = torch.zeros(hidden.shape, dtype=query.dtype, device=device).masked_fill_(hidden, -math.inf)
                own = ch.start if self.focus == "paper" and q_len - ch.start > 1 else None
                layout = _fast_layout(attention_mask, hidden[:, :, ch.start :], first, additive, own=own)
            if layout is not None:
                ch.layouts[key] = layout
                return layout
        allowed = _allowed(self, window, attention_mask, bsz, q_len, kv_len, offset, device)
        q_new = q_len - ch.start
        img_idx, img_visible = _key_index(self.image_pos, offset, kv_len)
        img_visible = img_visible & self.image_valid
        image_keep = (img_visible[:, None, :] & ch.new_text[..., None]).float()
        columns = torch.where(img_visible, img_idx, kv_len)  # keys not visible go to a spare column
        expand = (bsz, q_new, img_idx.shape[1])
        gather_index, gather_keep = img_idx[:, None, :].expand(expand), image_keep
        prev_weight = new_first = new_weight = None
        if self.focus != "tia":
            q_ord = ch.dest.float()  # text ordinal of each query row (used by "discounted")
            m_prev = ch.prev_pos.shape[1]
            if m_prev:
                k_ord = torch.arange(m_prev, device=device).float()
                prev_index, prev_weight = _weights(self, ch.prev_pos, offset, kv_len, q_ord, k_ord, q_new)
                prev_weight = prev_weight * ch.prev_valid[:, None, :]
                if prev_index is not None:
                    gather_index = torch.cat([gather_index, prev_index], dim=-1)
                    gather_keep = torch.cat([gather_keep, prev_weight.expand(bsz, q_new, m_prev)], dim=-1)
                    prev_weight = None
            if q_new > 1 and self.focus == "paper":  # the call's own earlier text rows (a one-row call has none)
                # the new rows are the layer's last tokens (always in its window): `_inhibited` takes W from `a`'s
                # columns in place, so no (B, q_new, q_new) weights (89 MiB at 2 x 3,400 text rows) live in the layout
                new_first, new_weight = self.length - offset - q_new, ch.new_text[:, None, :].float()
            elif q_new > 1:
                new_pos = (ch.past + ch.start + torch.arange(q_new, device=device)).expand(bsz, q_new)
                _, new_weight = _weights(self, new_pos, offset, kv_len, q_ord, q_ord, q_new)
                strictly_before = torch.ones(q_new, q_new, dtype=torch.bool, device=device).tril(-1)
                new_weight = new_weight * (strictly_before[None] & ch.new_text[:, None, :])
        layout = Layout(
            attention_mask, allowed, ~allowed[:, :, ch.start :], gather_index, gather_keep,
            columns[:, None, :].expand(expand), gather_index.shape[-1] > expand[-1], prev_weight, new_first, new_weight,
        )  # fmt: skip
        ch.layouts[key] = layout
        return layout

    def sees_everything(self, window: int | None, kv_len: int) -> bool:
        """In a fast decode step (`Chunk.fast`: no padding), the new token is allowed every key of a layer with
        ``kv_len`` keys: causality lets it see all earlier tokens, and a sliding window of ``window`` keys all of
        them when kv_len <= window (transformers' rule: key > query - window); a static layer's buffer holds empty
        slots past the tokens (kv_len > length), which its mask hides, and a 4D mask may hide any key."""
        ch = self.chunk
        return (
            ch.fast
            and ch.q_len == 1
            and not ch.mask_4d
            and kv_len <= self.length
            and (window is None or kv_len <= window)
        )

    def key_offset(self, module, q_len: int, kv_len: int, window: int | None) -> int:
        """Position of this layer's key 0, after checking the call matches the state (see module docstring)."""
        ch = self.chunk
        if ch is None:
            raise CMAIStateError(
                f"CMAI layer {module.layer_idx} was called but unclutter's forward pre-hook never ran for this call"
            )
        if q_len != ch.q_len:
            raise CMAIStateError(
                f"CMAI layer {module.layer_idx} got {q_len} queries but the forward pre-hook saw {ch.q_len} new tokens"
            )
        sliding = window is not None or getattr(module, "is_sliding", False)
        # more keys than tokens: a static layer's fixed buffer, positions from 0, the empty slots masked; fewer: a
        # window's last keys
        if kv_len < q_len or (kv_len > self.length and not self.static) or (kv_len < self.length and not sliding):
            raise CMAIStateError(
                f"CMAI layer {module.layer_idx} attends over {kv_len} keys but its state covers {self.length} tokens "
                f"({ch.past} cached + {q_len} new): the forward pre-hook did not find this call's cache"
            )
        return max(self.length - kv_len, 0)


def sliding_window(module, kwargs: dict) -> int | None:
    """The layer's attention window: what the model passes to the attention function (Mistral, Qwen2 and Gemma 3
    pass ``sliding_window=``; Mistral's modules have no such attribute), else the module's attribute; None: full."""
    window = kwargs.get("sliding_window")
    return window if window is not None else getattr(module, "sliding_window", None)


def _reorder_cache_following_cmai(cache, beam_idx: torch.Tensor) -> None:
    """``cache.reorder_cache`` while CMAI follows the cache (see `CMAIState._follow_reorders`)."""
    type(cache).reorder_cache(cache, beam_idx)
    ref = getattr(cache, "_unclutter_cmai_state", None)
    state = ref() if ref is not None else None
    if state is not None and state._cache_ref is not None and state._cache_ref() is cache:
        state._reorder(beam_idx.to(state.text_pos.device))


_reorder_cache_following_cmai.__name__ = "reorder_cache"  # what copy.deepcopy looks up on a copied cache


def _no_image_after_prefill(has_image: bool) -> None:
    if has_image:
        raise ValueError(
            "CMAI expects every image in the first forward call (the prefill); a later call brought image inputs "
            "with image tokens (a chunked prefill, or an image added to a cached conversation): a text token's "
            "focus quantile spans all image tokens of its prompt. Pass prefill_chunk_size=None (or a chunk size that "
            "puts every image token in the first chunk), or start a new generation (a fresh cache) with all images "
            "in its prompt."
        )


def _real_tokens(attention_mask, bsz: int, q_len: int, past: int, device) -> torch.Tensor:
    """(B, q_len) bool: which of the call's new tokens are real (not padding), from the mask the model was given: a
    2D padding mask (batch, sequence); or the 4D (B, 1, q_len, kv_len) masks that `generate` builds ahead for a static
    cache (one, or one per attention kind), or a user's, where a token is real iff it may attend to itself (a padding
    key is hidden from every query; the mask's key k holds position k + max(length - kv_len, 0), see `key_offset`)."""
    if isinstance(attention_mask, dict):  # {"full_attention": ..., "sliding_attention": ...}
        attention_mask = attention_mask.get("full_attention", next(iter(attention_mask.values()), None))
    if attention_mask is None:
        return torch.ones(bsz, q_len, dtype=torch.bool, device=device)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() not in (2, 4):
        raise ValueError(
            "CMAI reads padding from a 2D mask (batch, sequence) or a 4D one (batch, 1, queries, keys); got "
            f"{type(attention_mask).__name__} {tuple(getattr(attention_mask, 'shape', ()))}. Pass the processor's "
            "2D attention_mask."
        )
    if attention_mask.dim() == 2:
        if attention_mask.shape[1] > past + q_len:
            raise CMAIStateError(
                f"the attention mask covers {attention_mask.shape[1]} tokens but the call brings {q_len} new ones on "
                f"top of a cache of {past}: the forward pre-hook did not find this call's cache"
            )
        return attention_mask[:, -q_len:].bool()
    kv_len = attention_mask.shape[-1]
    if attention_mask.shape[-2] != q_len or kv_len < q_len:
        raise CMAIStateError(
            f"the 4D attention mask {tuple(attention_mask.shape)} does not fit a call of {q_len} new tokens on top of "
            f"a cache of {past}"
        )
    rows = torch.arange(q_len, device=attention_mask.device)
    own = attention_mask[:, 0, rows, past - max(past + q_len - kv_len, 0) + rows]  # each token's key for itself
    return _as_bool(own).to(device).expand(bsz, q_len)


def _as_bool(mask: torch.Tensor) -> torch.Tensor:
    """A mask as booleans, True = allowed: a boolean one as it is, an additive float one where it is not -inf (or
    the dtype's lowest value, which transformers uses instead)."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def _first_text_column(text: torch.Tensor) -> torch.Tensor:
    """(0-dim) the first column of ``text`` (B, q) that is a text row in some sample; q if none."""
    columns = torch.arange(text.shape[1], device=text.device)
    return torch.where(text.any(dim=0), columns, text.shape[1]).min()


def _check_cache_kind(cache) -> tuple[bool, int]:
    """Whether ``cache`` keeps any layer's keys in a fixed buffer (a static cache: see `CMAIState.key_offset`), and
    the tokens its full-attention buffers hold, which bound a generation (0 unless every full-attention layer is
    static: the fixed-shape decode step, `_static_decode_mask`, needs both)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise CMAIStateError(f"CMAI cannot follow a {type(cache).__name__} (it has no per-layer storage)")
    full = [layer for layer in layers if not getattr(layer, "is_sliding", False)]
    fixed = bool(full) and all(isinstance(layer, StaticLayer) for layer in full)
    tokens = min(layer.max_cache_len for layer in full) if fixed else 0
    return any(isinstance(layer, StaticLayer) for layer in layers), tokens


# Rows of (heads x keys) float32 logits per chunk of a long prompt's text queries (128 MiB): the head-averaged
# attention is computed a chunk of query rows at a time, so a prefill never holds all heads' (q, K) maps at once
# (32 heads x 2,000 text rows x 3,000 keys would be 0.8 GB per copy, several copies per layer). A decode step and a
# short prompt fit one chunk: the same operators as unchunked.
_LOGITS_PER_CHUNK = 1 << 25


def _head_mean_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    disallowed: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    empty_rows: bool = True,
) -> torch.Tensor:
    """Head-averaged softmax attention (B, q, K) in float32, grouped-query aware.

    query: (B, H, q, D); key: (B, Hkv, K, D); disallowed: (B, 1, q, K) bool, or None when every key is allowed.
    empty_rows: some row may have every key disallowed (padding); its probabilities are 0 instead of NaN.
    Query rows are taken `_LOGITS_PER_CHUNK` logits at a time (each row's values do not depend on the chunking).
    """
    bsz, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    keys = _contiguous_float(key).view(bsz * kv_heads, kv_len, dim).transpose(1, 2)
    rows = max(1, _LOGITS_PER_CHUNK // max(1, bsz * heads * kv_len))
    if rows >= q_len:
        return _chunk_head_mean_probs(query, keys, disallowed, scaling, softcap, empty_rows, kv_heads)
    out = torch.empty(bsz, q_len, kv_len, dtype=torch.float32, device=query.device)
    for start in range(0, q_len, rows):
        stop = min(start + rows, q_len)
        part = None if disallowed is None else disallowed[:, :, start:stop]
        out[:, start:stop] = _chunk_head_mean_probs(
            query[:, :, start:stop], keys, part, scaling, softcap, empty_rows, kv_heads
        )
    return out


def _chunk_head_mean_probs(query, keys, disallowed, scaling, softcap, empty_rows, kv_heads) -> torch.Tensor:
    """`_head_mean_probs` of some query rows; keys: (B * Hkv, D, K) float32."""
    bsz, heads, q_len, dim = query.shape
    kv_len = keys.shape[-1]
    # at most one copy of the queries (float32 and contiguous at once, so the reshape is a view), and the scaling
    # inside the batched matmul
    grouped = _contiguous_float(query).view(bsz * kv_heads, -1, dim)
    # beta=0: the addend is ignored (documented: not even its NaNs propagate), so an uninitialised one is enough
    logits = torch.baddbmm(keys.new_empty(1, 1, 1), grouped, keys, beta=0.0, alpha=scaling)
    logits = logits.view(bsz, heads, q_len, kv_len)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if disallowed is None:
        return logits.softmax(dim=-1).mean(dim=1)
    probs = logits.masked_fill_(disallowed, float("-inf")).softmax(dim=-1)  # the logits are ours: in place
    if empty_rows:
        probs = torch.nan_to_num_(probs, nan=0.0)  # fully masked rows (padding) -> 0
    return probs.mean(dim=1)


def _contiguous_float(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.float32:
        return x.contiguous()
    return x.to(torch.float32, memory_format=torch.contiguous_format)  # a copy, so the format is honoured


def _key_index(pos: torch.Tensor, offset: int | torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Key index of absolute positions ``pos`` in a layer whose key 0 is at ``offset``, and visibility."""
    idx = pos - offset
    visible = (idx >= 0) & (idx < kv_len)
    return idx.clamp(0, max(kv_len - 1, 0)), visible


def _own_rows_before(a: torch.Tensor, first: int) -> torch.Tensor:
    """(B, q_new, q_new) the attention of each new row ``a`` (B, q_new, K) to the call's own rows before it (Eq. 9's
    strictly lower A_t2n), the call's rows being keys ``first`` on: ``a``'s own columns, zeroed in place on and above
    the diagonal (no (q, q) copy). The caller gives those columns up, having read what else it needs from ``a``
    (the fast path's image block ends before them; the general path gathers its columns first)."""
    return a[..., first : first + a.shape[1]].tril_(-1)


def _inhibited(state: CMAIState, layer: int, gamma: float, a: torch.Tensor, lay: Layout) -> torch.Tensor:
    """(B, q_new, n) bool inhibition for the new text rows, from their head-averaged rows ``a`` (B, q_new, K), which
    the caller gives up: for "paper", its columns of this call's own text rows are overwritten with their weights."""
    gathered = a.gather(2, lay.gather_index) * lay.gather_keep
    n = state.image_pos.shape[1]
    t2i = gathered[..., :n] if lay.prev_gathered else gathered
    focus = t2i  # never changed in place: each term below makes a new tensor
    w_prev = gathered[..., n:] if lay.prev_gathered else lay.prev_weight
    if w_prev is not None:  # Eq. 10 over the text rows of earlier calls, stored per layer
        focus = focus + w_prev @ state.rows[layer][:, : w_prev.shape[-1]]
    if lay.new_weight is not None:  # ... and over this call's own earlier text rows
        w_new = lay.new_weight
        if lay.new_first is not None:  # "paper": the attention to them, only where the column is a text row
            w_new = _own_rows_before(a, lay.new_first).mul_(lay.new_weight)
        focus = focus + w_new @ t2i
    state.store(layer, t2i)
    return (focus < state.quantile(focus, gamma)) & state.chunk.inhibitable


def _weights(state: CMAIState, key_pos: torch.Tensor, offset: int, kv_len: int, q_ord, k_ord, q_new: int):
    """How much text key h counts in query j's focus score, before validity masking: (index, weight) with
    W = a.gather(2, index) * weight for "paper" (the query's attention to that text token, Eq. 9-10; 0 once out
    of the window), or (None, W) for the modes whose weights do not depend on the attention."""
    bsz = key_pos.shape[0]
    if state.focus == "paper":
        idx, visible = _key_index(key_pos, offset, kv_len)
        return idx[:, None, :].expand(bsz, q_new, idx.shape[1]), visible[:, None, :].float()
    k_ord = k_ord if k_ord.dim() == 2 else k_ord[None].expand(bsz, -1)
    if state.focus == "sum":
        return None, torch.ones(bsz, q_new, k_ord.shape[1], dtype=torch.float32, device=key_pos.device)
    dist = (q_ord[:, :, None] - k_ord[:, None, :]).clamp_min(0)
    return None, state.discount**dist


def _allowed(state: CMAIState, window, attention_mask, bsz: int, q_len: int, kv_len: int, offset: int, device):
    """The layer's boolean mask (B, 1, q, kv): the one transformers built, or causal + padding + window."""
    if attention_mask is not None:
        return _as_bool(attention_mask).expand(bsz, 1, q_len, kv_len)
    q_pos = state.chunk.past + torch.arange(q_len, device=device)
    k_pos = offset + torch.arange(kv_len, device=device)
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - window
    pad = state.pad[:, offset : offset + kv_len]
    pad = torch.nn.functional.pad(pad, (0, kv_len - pad.shape[1]))  # a static buffer's empty slots (causally hidden)
    return (allowed[None, None] & pad[:, None, None]).expand(bsz, 1, q_len, kv_len)


def _fast_layout(mask, disallowed, first: int, additive: torch.Tensor, *, prev_index=None, own=None) -> Layout:
    """A `Layout` for the fast path: only ``disallowed`` of the general path's fields (None: every key allowed)."""
    return Layout(
        mask, None, disallowed, None, None, None, False, None, None, None,
        fast_first=first, fast_mask=additive, fast_prev_index=prev_index, fast_own=own,
    )  # fmt: skip


def _block_start(image_pos: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """First position of the image keys if every sample's are the same contiguous run, else -1 (0-dim long)."""
    n = image_pos.shape[1]
    if n == 0:
        return torch.tensor(-1, device=image_pos.device)
    first = image_pos[:, 0]
    simple = (counts == n).all() & (image_pos[:, -1] - first == n - 1).all() & (first == first[0]).all()
    return torch.where(simple, first[0], -1)


def _fast_mask(state: CMAIState, layer: int, gamma: float, query, key, scaling, softcap, lay: Layout, in_place=False):
    """The additive SDPA mask (B, 1, q_len, kv_len) of a fast call (`Chunk.fast`): the general path's arithmetic
    where the host already knows what it computes (one contiguous image block of n keys in every sample, no
    padding, every new row from ``start`` on a text query, every stored row valid), so the image keys are a slice,
    the text rows' weights a slice or one gather, and the quantile positions host numbers.

    ``in_place``: write the inhibition into the layout's shared mask instead of a copy of it (a prefill's (q, K)
    mask), and return it with what `_restore` puts back after the layer's SDPA; else (mask, None)."""
    start = state.chunk.start
    queries = query if start == 0 else query[:, :, start:]
    a = _head_mean_probs(queries, key, lay.disallowed, scaling, softcap, empty_rows=False)  # (B, q_new, kv_len)
    first, n = lay.fast_first, state.block[1]
    t2i = a[..., first : first + n]
    focus = t2i
    if lay.fast_prev_index is not None:  # Eq. 10 over earlier calls' text rows (a decode step), stored per layer
        m_prev = lay.fast_prev_index.shape[-1]
        focus = torch.baddbmm(t2i, a.gather(2, lay.fast_prev_index), state.rows[layer][:, :m_prev])
    if lay.fast_own is not None:  # ... and over this call's own earlier text rows (a prefill)
        focus = torch.baddbmm(focus, _own_rows_before(a, lay.fast_own), t2i)
    state.store(layer, t2i, slot=state.text_bound - t2i.shape[1])
    # the row's quantile from its two order statistics (every row has all n keys): a selection, not a sort (on CPU
    # a prefill's rows select 4x faster than they sort), the same values the general path's sort gives
    lower, upper, weight = state.fast_plan(gamma, query.device)
    low = focus.kthvalue(lower + 1, dim=-1, keepdim=True).values
    threshold = (
        low if upper == lower else torch.lerp(low, focus.kthvalue(upper + 1, dim=-1, keepdim=True).values, weight)
    )
    inhibit = focus < threshold
    if state.tracing:
        state.trace.setdefault(layer, []).append(inhibit[:, -1].cpu())
    if in_place:
        region = lay.fast_mask[:, :, start:, first : first + n]
        saved = region.clone()  # (B, 1, q_new, n): a small part of the (B, 1, q_len, kv_len) mask
        region.masked_fill_(inhibit[:, None], -math.inf)
        return lay.fast_mask, (region, saved)
    mask = lay.fast_mask.clone()
    mask[:, :, start:, first : first + n].masked_fill_(inhibit[:, None], -math.inf)
    return mask, None


@torch.compiler.disable
def _restore(undo) -> None:
    """Put back the part of a shared layout mask that `_fast_mask` edited in place."""
    region, saved = undo
    region.copy_(saved)


def cmai_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA with CMAI's inhibition added to the mask of the module's layer (plain SDPA elsewhere). With
    ``output_attentions`` it also returns the softmax weights that attention used, inhibition included."""
    ctx = getattr(module, "_unclutter_cmai", None)
    if ctx is None:
        return _sdpa(module, query, key, value, attention_mask, scaling, dropout, kwargs)
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("CMAI does not support attention sinks (s_aux).")
    scaling = module.scaling if scaling is None else scaling
    state = ctx()
    if state is not None and state.capturable:  # a static cache's decode step: traced, no graph break
        mask = _static_decode_mask(state, module.layer_idx, query, key, attention_mask, scaling, kwargs.get("softcap"))
        return _sdpa(module, query, key, value, mask, scaling, dropout, kwargs)
    mask, undo = _layer_mask(module, query, key, attention_mask, scaling, sliding_window(module, kwargs), kwargs)
    try:
        return _sdpa(module, query, key, value, mask, scaling, dropout, kwargs)
    finally:
        if undo is not None:
            _restore(undo)


# bookkeeping on host numbers, run eagerly: one graph break per CMAI layer and no compiled guard on CMAI's state (which
# changes every call); inductor also miscompiled the masks' mixed bool/float vectors on CPU
@torch.compiler.disable
def _layer_mask(module, query, key, attention_mask, scaling: float, window: int | None, kwargs: dict):
    """The mask the layer's SDPA takes under CMAI, and what `_restore` puts back after it (see `_fast_mask`)."""
    state: CMAIState | None = module._unclutter_cmai()  # (a weak reference: read here, where dynamo does not trace)
    if state is None:
        return attention_mask, None
    bsz, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    offset = state.key_offset(module, q_len, kv_len, window)  # raises when the state does not match this call
    layer = module.layer_idx
    gamma = state.gammas.get(layer, 0.0)
    ch = state.chunk
    n = state.image_pos.shape[1]
    if gamma == 0.0 or ch.start >= ch.q_len or n == 0:
        if state.tracing and gamma and n:  # a call without text queries inhibits nothing (one trace row per call)
            state.trace.setdefault(layer, []).append(torch.zeros(bsz, n, dtype=torch.bool))
        # all True: SDPA's unmasked kernel, as stock transformers would call it
        return (None if state.sees_everything(window, kv_len) else attention_mask), None
    # a prefill without autograd edits the layout's shared (q, K) mask in place and puts it back after SDPA, rather
    # than copying it per layer (under autograd SDPA keeps its mask for the backward pass: a copy each)
    in_place = q_len > 1 and not torch.is_grad_enabled()
    # autocast off: under bf16 mixed precision the matmuls would drop to bf16 and shift the quantile
    with torch.no_grad(), autocast_disabled(query.device.type):
        lay = state.layout(module, attention_mask, bsz, q_len, kv_len, offset, query, window)
        return _mask(state, layer, gamma, query, key, scaling, kwargs.get("softcap"), lay, in_place)


def _static_decode_mask(state: CMAIState, layer: int, query, key, attention_mask, scaling: float, softcap):
    """The additive SDPA mask (B, 1, 1, kv_len) of a layer in a decode step on a static cache
    (`CMAIState.capturable`): the general path's arithmetic (`_general_mask`: padding, several images, a sample whose
    token is not text, sliding windows) in shapes fixed for the whole generation, so that torch.compile traces it
    into the decode step's graph and CUDA graphs can replay it. Where the layer's keys start (`CMAIState.key_offset`:
    0 while a static buffer has room, empty slots hidden by ``attention_mask``; a full sliding window's first kept
    position) is computed on the device, and Eq. 10's earlier text rows are all of the rows' capacity, those not
    stored yet weighted 0 (a sum with zero terms: the values of the other paths up to rounding). Every host value
    read here (gamma, the focus mode, the capacity, the query and key counts) stays the same from step to step."""
    gamma = state.gammas.get(layer, 0.0)
    kv_len = key.shape[2]
    if attention_mask is None or query.shape[2] != 1:
        raise CMAIStateError(
            f"CMAI layer {layer} expected a static cache's decode step (one query and a mask), got "
            f"{query.shape[2]} queries and mask {type(attention_mask).__name__}"
        )
    if gamma == 0.0:
        return attention_mask
    ch = state.chunk
    rows = state.rows[layer]  # (B, capacity + 1, n): every earlier text row of this layer, then zeros, a spare slot
    capacity = rows.shape[1] - 1
    bsz, device = query.shape[0], query.device
    with torch.no_grad(), autocast_disabled(device.type):
        hidden = ~_allowed(state, None, attention_mask, bsz, 1, kv_len, 0, device)  # (the mask's, never derived)
        a = _head_mean_probs(query, key, hidden, scaling, softcap)  # (B, 1, kv_len)
        offset = (ch.length - kv_len).clamp_min(0)
        image_index, image_visible = _key_index(state.image_pos, offset, kv_len)
        image_visible = image_visible & state.image_valid
        t2i = a.gather(2, image_index[:, None, :]) * image_visible[:, None, :]  # (B, 1, n)
        focus = t2i
        if state.focus != "tia":
            ordinal = torch.arange(capacity, device=device)
            before = (state.text_count - ch.new_text.sum(dim=1))[:, None, None]  # (B, 1, 1) rows stored before
            weights = (ordinal < before).float()  # "sum"
            if state.focus == "paper":  # the attention to the text token, 0 once it left the window
                text_index, text_visible = _key_index(state.text_pos[:, :capacity], offset, kv_len)
                weights = weights * a.gather(2, text_index[:, None, :]) * text_visible[:, None, :]
            elif state.focus == "discounted":
                weights = weights * state.discount ** (ch.dest[:, :, None] - ordinal).clamp_min(0).float()
            focus = torch.baddbmm(t2i, weights, rows[:, :capacity])
        rows.scatter_(1, ch.store_index, t2i)  # a row that is not text goes to the spare slot
        inhibit = (focus < state.quantile(focus, gamma)) & ch.inhibitable  # (B, 1, n)
        columns = torch.where(image_visible, image_index, kv_len)[:, None, :]  # not a key here: a spare column
        blocked = torch.zeros(bsz, 1, kv_len + 1, dtype=torch.bool, device=device).scatter_(2, columns, inhibit)
        mask = torch.zeros(hidden.shape, dtype=query.dtype, device=device)
        mask.masked_fill_(hidden | blocked[:, None, :, :kv_len], -math.inf)
    return mask


def _sdpa(module, query, key, value, mask, scaling, dropout, kwargs: dict):
    """SDPA's output, and with ``output_attentions`` the (B, H, q, kv) weights of that same attention (eager's
    convention: softmax in float32, returned in the query's dtype, a row with no allowed key uniform). SDPA itself
    returns none, so a model loaded with eager attention kept its attention maps only without CMAI."""
    want = kwargs.pop("output_attentions", False)
    out, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)
    if not want:
        return out, None
    scaling = module.scaling if scaling is None else scaling
    keys = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)  # grouped-query heads
    with autocast_disabled(query.device.type):
        logits = (query.float() @ keys.float().transpose(-1, -2)) * scaling
        softcap = kwargs.get("softcap")
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        lowest = torch.finfo(torch.float32).min
        if mask is not None and mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, lowest)
        elif mask is not None:
            logits = (logits + mask[..., : keys.shape[2]]).clamp_min(lowest)
        return out, logits.softmax(dim=-1).to(query.dtype)


def _mask(state: CMAIState, layer: int, gamma: float, query, key, scaling, softcap, lay: Layout, in_place=False):
    """The layer's SDPA mask and, when `_fast_mask` edited a shared one in place, what `_restore` puts back."""
    if lay.fast_mask is not None:
        return _fast_mask(state, layer, gamma, query, key, scaling, softcap, lay, in_place)
    return _general_mask(state, layer, gamma, query, key, scaling, softcap, lay), None


def _general_mask(state: CMAIState, layer: int, gamma: float, query, key, scaling, softcap, lay: Layout):
    """The boolean SDPA mask (B, 1, q_len, kv_len) of any call: the layer's own mask with each new text row's
    inhibited image keys removed."""
    ch = state.chunk
    bsz, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    queries = query if ch.start == 0 else query[:, :, ch.start :]
    a = _head_mean_probs(queries, key, lay.disallowed, scaling, softcap)
    inhibit = _inhibited(state, layer, gamma, a, lay)  # (B, q_new, n)
    if state.tracing:
        state.trace.setdefault(layer, []).append(inhibit[:, -1].cpu())
    blocked = torch.zeros(bsz, q_len - ch.start, kv_len + 1, dtype=torch.bool, device=query.device)
    blocked.scatter_(2, lay.columns, inhibit)
    if ch.start == 0:
        mask = lay.allowed & ~blocked[:, None, :, :kv_len]
    else:
        mask = lay.allowed.clone()
        mask[:, 0, ch.start :] &= ~blocked[..., :kv_len]
    return mask
