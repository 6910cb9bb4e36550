"""DPO with each pair's prompt through the model once: the chosen and rejected rows packed into one.

TRL's DPO batch is `[chosen_1 .. chosen_n, rejected_1 .. rejected_n]`, each row a prompt and a completion, padded on
the right, so row i and row i + n begin with the same tokens: the prompt, and whatever the two completions begin
with alike. `pack` lays pair i out as one row: row i whole, then the tokens of row i + n after the prefix they share,
at row i + n's own positions, under a 4-D mask by which those tokens see the shared prefix and each other but not
row i's tail. In a causal model a position's hidden state depends only on the tokens up to it, so the hidden states
`unpack` puts back in TRL's layout are the unpacked forward's, summed in another order. A pair costs
`len(chosen) + len(rejected) - shared` positions instead of twice the batch's longest row.

`shared_prompts(model)` installs this on the model's backbone while TRL trains (the policy's pass and the
reference's): the LM head, the loss and TRL's metrics see TRL's own layout. It is exact only where nothing is drawn
at random per row, so it stays off while any dropout is active; it needs an attention that takes a 4-D mask
(`sdpa`, `eager`) and a backbone that takes `position_ids`. On its first batch it computes that batch both ways and
turns itself off, with a warning, if the hidden states differ beyond rounding (a model whose attention the mask
does not describe: a sliding window shorter than the row, say).

>>> import torch
>>> ids = torch.tensor([[5, 6, 7, 8, 0], [5, 6, 9, 0, 0]])
>>> p = pack(ids, (ids > 0).long())
>>> p.input_ids.tolist(), p.position_ids.tolist()
([[5, 6, 7, 8, 9]], [[0, 1, 2, 3, 2]])
>>> p.mask[0, 0].int().tolist()[4]   # the rejected row's own token sees the prompt and itself, not 7 and 8
[1, 1, 0, 0, 1]
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

# Attention implementations that read a 4-D mask as given: a boolean one (True: may attend) for sdpa, an additive
# one for eager.
MASKED_ATTENTION = ("sdpa", "eager")


@dataclass
class Packing:
    input_ids: torch.Tensor  # [n, Lp]
    position_ids: torch.Tensor  # [n, Lp]
    mask: torch.Tensor  # [n, 1, Lp, Lp], True where a query may attend to a key
    index: torch.Tensor  # [2n, L]: each original position's place in the packed rows, flattened; n * Lp is a zero row
    positions: int  # n * Lp, what the packed forward computes (against 2n * L)


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Packing | None:
    """Pair row i with row i + n and pack each pair into one row (see the module's docstring). None where the rows
    are not right-padded or packing would compute no fewer positions."""
    rows, length = input_ids.shape
    if rows == 0 or rows % 2:
        return None
    lengths = attention_mask.sum(1)
    if not torch.equal(attention_mask.bool(), torch.arange(length, device=lengths.device)[None] < lengths[:, None]):
        return None  # not right-padded: the rows' positions are not 0..len-1
    n = rows // 2
    real = attention_mask.bool()
    same = (input_ids[:n] == input_ids[n:]) & real[:n] & real[n:]
    shared = same.long().cumprod(1).sum(1)
    packed_lengths = lengths[:n] + lengths[n:] - shared
    width = int(packed_lengths.max())
    if n * width >= rows * length:
        return None
    device = input_ids.device
    ids = input_ids.new_zeros((n, width))
    positions = torch.zeros((n, width), dtype=torch.long, device=device)
    mask = torch.zeros((n, 1, width, width), dtype=torch.bool, device=device)
    index = torch.full((rows, length), n * width, dtype=torch.long, device=device)
    causal = torch.ones((width, width), dtype=torch.bool, device=device).tril()
    steps = torch.arange(width, device=device)
    for i in range(n):
        a, b, s = int(lengths[i]), int(lengths[n + i]), int(shared[i])
        end = a + b - s
        ids[i, :a], ids[i, a:end] = input_ids[i, :a], input_ids[n + i, s:b]
        positions[i, :a], positions[i, a:end] = steps[:a], steps[s:b]
        m = mask[i, 0]
        m[:a, :a] = causal[:a, :a]  # the chosen row, as it was
        m[a:end, :s] = True  # the rejected row's own tokens see the shared prefix ...
        m[a:end, a:end] = causal[: end - a, : end - a]  # ... and each other
        m[steps[end:], steps[end:]] = True  # padding sees itself (a query that sees nothing gives NaN)
        index[i, :a] = i * width + steps[:a]
        index[n + i, :s] = i * width + steps[:s]
        index[n + i, s:b] = i * width + a + steps[: b - s]
    return Packing(ids, positions, mask, index, n * width)


def unpack(hidden: torch.Tensor, packing: Packing) -> torch.Tensor:
    """The packed rows' hidden states [n, Lp, H] in the original layout [2n, L, H] (zeros at padding)."""
    flat = torch.cat([hidden.reshape(-1, hidden.size(-1)), hidden.new_zeros(1, hidden.size(-1))])
    return flat[packing.index]


def _attention_mask(packing: Packing, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    if implementation == "sdpa":
        return packing.mask
    return torch.zeros_like(packing.mask, dtype=dtype).masked_fill(~packing.mask, torch.finfo(dtype).min)


def dropout_active(model: torch.nn.Module) -> bool:
    """Whether training `model` draws anything at random per row: a dropout module or a config's dropout above 0."""
    if any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
        return True
    configs = {id(c): c for m in model.modules() if hasattr(c := getattr(m, "config", None), "to_dict")}  # shared by layers
    return any(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for c in configs.values()
               for k, v in c.to_dict().items() if "dropout" in k or k.endswith("pdrop"))


def backbone_of(model: torch.nn.Module) -> torch.nn.Module | None:
    """The causal LM's backbone (what TRL's fused LM head calls as `base_model`), under PEFT's wrappers."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(inner, "base_model", None)
    return backbone if isinstance(backbone, torch.nn.Module) and backbone is not inner else None


def why_not(model: torch.nn.Module) -> str | None:
    """Why prompts cannot be shared while training `model`, or None if they can."""
    backbone = backbone_of(model)
    if backbone is None:
        return "no backbone found under the model"
    implementation = getattr(backbone.config, "_attn_implementation", None)
    if implementation not in MASKED_ATTENTION:
        return f"its attention ({implementation}) does not take a 4-D mask"
    if "position_ids" not in inspect.signature(backbone.forward).parameters:
        return "its backbone takes no position_ids"
    if dropout_active(model):
        return "dropout is on (a shared prompt would draw one dropout mask for both rows, not one each)"
    return None


class _SharedForward:
    """The backbone's forward, packing [chosen; rejected] batches; checks its first packed batch against the plain
    forward."""

    def __init__(self, backbone: torch.nn.Module):
        self.backbone, self.original = backbone, backbone.forward
        self.implementation = backbone.config._attn_implementation
        self.checked = False
        self.enabled = True
        self.computed = self.unpacked = 0  # positions, for the log line

    def __call__(self, *args, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        plain = lambda: self.original(*args, input_ids=input_ids, attention_mask=attention_mask,  # noqa: E731
                                      position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs)
        if (not self.enabled or args or input_ids is None or inputs_embeds is not None or position_ids is not None
                or attention_mask is None or attention_mask.ndim != 2 or kwargs.get("use_cache")
                or any(kwargs.get(k) for k in ("output_hidden_states", "output_attentions", "output_router_logits"))):
            return plain()
        packing = pack(input_ids, attention_mask)
        if packing is None:
            return plain()
        dtype = self.backbone.get_input_embeddings().weight.dtype
        out = self.original(input_ids=packing.input_ids, position_ids=packing.position_ids,
                            attention_mask=_attention_mask(packing, self.implementation, dtype), **kwargs)
        hidden = unpack(out.last_hidden_state, packing)
        if not self.checked:
            self.checked = True
            with torch.no_grad():
                expected = plain().last_hidden_state
            real = attention_mask.bool()
            error = float((hidden.detach()[real] - expected[real]).abs().max())
            scale = float(expected[real].abs().max())
            device = hidden.device.type
            low = dtype != torch.float32 or (torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) != torch.float32)
            tolerance = (3e-2 if low else 1e-3) * max(scale, 1.0)
            if not error <= tolerance:
                self.enabled = False
                log.warning("training: the prompt-shared forward differs from the plain one on this model (largest "
                            "difference %.3g, against %.3g): it is off for this round; set train.share_prompt: false "
                            "to skip the check", error, tolerance)
                return plain()
        self.computed += packing.positions
        self.unpacked += input_ids.numel()
        out.last_hidden_state = hidden
        return out


@contextlib.contextmanager
def shared_prompts(model: torch.nn.Module) -> Iterator[_SharedForward | str]:
    """While it is open, the model's backbone packs each [chosen; rejected] pair into one row. Yields the installed
    forward (its `computed` and `unpacked` count positions), or, where it cannot be installed, why not."""
    reason = why_not(model)
    if reason is not None:
        yield reason
        return
    backbone = backbone_of(model)
    before = backbone.__dict__.get("forward")  # a hook's forward, if one was set on the instance
    forward = _SharedForward(backbone)
    backbone.forward = forward
    try:
        yield forward
    finally:
        if before is None:
            del backbone.forward  # the class's forward shows through again
        else:
            backbone.forward = before
