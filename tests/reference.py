"""CMAI written straight from the paper's Eq. 9-11 with Python loops, as an eager attention function.

Family-agnostic: it takes the attention mask transformers built for the layer (causal, padding, sliding
window, bidirectional image blocks...) as the layer's attention pattern, computes the full head-averaged
attention in float64, and inhibits per text row the image keys whose focus score lies strictly below
the row's gamma-quantile (over the sample's image tokens). Full forward only (no cache).
"""

import copy

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import unclutter


def _mask(*args, **kwargs):
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


class NaiveReference:
    def __init__(self, media_ids, structural_ids, gammas):
        self.media_ids, self.structural_ids, self.gammas = set(media_ids), set(structural_ids), gammas
        self.input_ids = self.pad = None

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        bsz, heads, length, _ = query.shape
        rep = heads // key.shape[1]
        key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
        allowed = attention_mask.expand(bsz, 1, length, length)[:, 0].bool()
        scaling = module.scaling if scaling is None else scaling
        scores = (query.double() @ key.double().transpose(-1, -2)) * scaling
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        probs = torch.nan_to_num(scores.softmax(-1), nan=0.0)
        avg = probs.mean(1).cpu()  # the loops below read it element by element (on the host, whatever the device)
        pad = self.pad.cpu()
        gamma = self.gammas.get(module.layer_idx, 0.0)
        for b in range(bsz):
            ids = self.input_ids[b].tolist()
            img = [p for p, t in enumerate(ids) if t in self.media_ids]
            if not img or gamma == 0:
                continue
            text = [
                p
                for p in range(length)
                if p > img[0] and ids[p] not in self.media_ids and ids[p] not in self.structural_ids and pad[b, p]
            ]
            m, n = len(text), len(img)
            f = torch.zeros(m, n, dtype=torch.float64)
            for j in range(m):
                for k in range(n):
                    f[j, k] = avg[b, text[j], img[k]] + sum(
                        avg[b, text[j], text[h]] * avg[b, text[h], img[k]] for h in range(j)
                    )
            thr = torch.quantile(f, gamma, dim=-1, keepdim=True)
            for j in range(m):
                for k in range(n):
                    if f[j, k] < thr[j, 0]:
                        scores[b, :, text[j], img[k]] = float("-inf")
        probs = torch.nan_to_num(scores.softmax(-1), nan=0.0)
        out = (probs @ value.double()).to(query.dtype)
        return out.transpose(1, 2).contiguous(), probs.to(query.dtype)  # the weights, as eager attention returns


def written_out_output_importance(info, importance: torch.Tensor, keep: int, tokens: int) -> torch.Tensor:
    """(rows, tokens) importance of the patch tokens a VMTC stage output, written out: a kept patch its own, a
    merged token the sum over its members (what `vmtc.output_importance` computes); ``importance`` (rows, N)."""
    out = torch.zeros(len(importance), tokens)
    for row in range(len(importance)):
        for j, patch in enumerate(info.kept_index[row].tolist()):
            out[row, j] = importance[row, patch]
        for patch, cid in zip(info.merged_index[row].tolist(), info.cluster[row].tolist(), strict=True):
            if cid >= 0:
                out[row, keep + cid] += importance[row, patch]
    return out


def reference_logits(model, batch, gammas, *, roles=None, structural=()):
    """Logits of a deep copy of ``model`` whose LLM runs `NaiveReference` (no cache).

    roles: token ids that decide each position's role (image key, structural, text), if not ``batch["input_ids"]``
    (a batch given as ``inputs_embeds``); structural: more ids to count as structural."""
    return reference_outputs(model, batch, gammas, roles=roles, structural=structural).logits


def reference_outputs(model, batch, gammas, *, roles=None, structural=(), **kwargs):
    """`reference_logits`' whole model output (``output_attentions=True``: each layer's inhibited weights)."""
    adapter = unclutter.integrations.base.adapter_for(model)(model)
    ref_model = copy.deepcopy(model)
    ref_adapter = type(adapter)(ref_model)
    ref = NaiveReference(adapter.media_token_ids(), [*adapter.structural_token_ids(), *structural], gammas)
    AttentionInterface.register("naive_cmai_test", ref)
    AttentionMaskInterface.register("naive_cmai_test", _mask)
    ref_adapter.language_model.set_attn_implementation("naive_cmai_test")
    ref.input_ids, ref.pad = batch["input_ids"] if roles is None else roles, batch["attention_mask"]
    with torch.no_grad():
        return ref_model(**batch, use_cache=False, **kwargs)
