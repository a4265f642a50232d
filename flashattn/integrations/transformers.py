"""Hugging Face transformers: this library as an attention implementation of transformers' models.

Importing this module registers an attention function in transformers' `AttentionInterface` and a mask
function in its `AttentionMaskInterface`, both under the name `ATTN_IMPLEMENTATION`:

    import flashattn.integrations.transformers as fa_hf
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation=fa_hf.ATTN_IMPLEMENTATION)

(`from_config(config, attn_implementation=...)` and `model.set_attn_implementation(...)` take it too.)
Every model whose attention layers call `ALL_ATTENTION_FUNCTIONS.get_interface(...)` (the models with
`_supports_attention_backend = True`: Llama, Mistral, Qwen2/3, Gemma, GPT-2 and most recent ones) then
calls `attention_forward` below, on the Triton kernels for CUDA tensors and the PyTorch path elsewhere.

How a model's mask reaches the attention (the same split as transformers' own flash-attention path,
`transformers/modeling_flash_attention_utils.py`, plus a dense fallback it lacks):

- The mask function (`attention_mask_function`) returns, for the plain patterns (causal, bidirectional,
  and their sliding-window forms), the 2D key-padding mask (batch, kv_length), True = a real token, or
  None when nothing is padded. The attention function then packs the real tokens (unpad_input), calls
  flash_attn_varlen_func, and pads the result back; without padding it calls flash_attn_func. Causal
  masking is aligned to the bottom-right corner (flash-attn >= 2.1), which is what decoding against a
  cache needs: a short query against the cache's keys (`DynamicCache`: transformers hands the attention
  function the cache's full keys and values). flash_attn_func takes a short query through its split-KV
  kernel; with left padding, as generation pads, a short query in inference takes that kernel too,
  through flash_attn_with_kvcache with each row's keys starting past its padding (cache_leftpad),
  rather than the packed path. Sliding windows come from the `sliding_window` keyword the attention layers pass,
  with flash-attention's convention, which the models are written to: window_size = (w - 1, 0)
  causal, i.e. query i sees keys i - w + 1 .. i (eager's `kv_idx > q_idx - sliding_window`), and
  (w - 1, w - 1) bidirectional.
- Any other pattern (a model's `or_mask_function` / `and_mask_function` overlays such as bidirectional
  image tokens, chunked attention, blockwise overlays, sequences packed in one row detected from
  position_ids): the mask function builds transformers' dense 4D bool mask (`sdpa_mask`) and the
  attention function passes it as `attn_bias`, with no causal flag or window of its own, exactly as
  SDPA does. Correct for every pattern, at the cost of the O(q_len x kv_len) mask. A 4D mask a user
  passes to the model directly (bool, or additive float) takes the same path.
- Packed sequences with flash-attention's keyword arguments (`cu_seq_lens_q`, `cu_seq_lens_k`,
  `max_length_q`, `max_length_k`, as `DataCollatorWithFlattening(return_flash_attn_kwargs=True)`
  produces) and no mask go through flash_attn_varlen_func.

A model's additive position bias, passed as `position_bias` (T5 and its family: relative position
buckets, learned), becomes the kernels' `attn_bias`, merged with the mask as transformers' SDPA path
merges them, and gets its gradient. Models whose attention layers compute attention themselves (MPT,
MPNet: no `AttentionInterface` call) cannot take this implementation, nor SDPA's or flex's registered
names: their own code then receives this library's key-padding mask and fails.

GQA/MQA run without repeating keys and values (the kernels take nheads_k). `softcap` (Gemma 2),
`scaling`, `dropout` (applied only while `module.training`, as eager's `nn.functional.dropout`) and
`is_causal` are honoured; attention sinks (`s_aux`, gpt-oss) are not implemented and raise
NotImplementedError, and `output_attentions` returns None weights with a warning, as flash-attention
does in transformers.

transformers is an optional dependency (`pip install flashattn[transformers]`), imported here only.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers import masking_utils
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from flashattn.bert_padding import index_first_axis, pad_input, unpad_input
from flashattn.interface import flash_attn_func
from flashattn.kvcache import flash_attn_with_kvcache
from flashattn.varlen import flash_attn_varlen_func

Tensor = torch.Tensor

__all__ = ["ATTN_IMPLEMENTATION", "attention_forward", "attention_mask_function", "register"]

# The name this library is registered under. It must not contain "flash": transformers 5 treats every
# name containing it as a request for its own flash-attention loader. In transformers 5.24,
# `transformers.utils.generic.is_flash_attention_requested` returns `"flash" in
# checked_attention_implementation`, and `PreTrainedModel._check_and_adjust_attn_implementation`
# (modeling_utils.py), for such a name, calls `lazy_import_flash_attention(...)`, whose `_lazy_imports`
# (modeling_flash_attention_utils.py) imports the flash-attn package or, failing that, loads the name as
# a hub kernel (`load_and_register_attn_kernel`), never our function; `create_chunked_causal_mask` and
# others test it too. Nor may it contain "sdpa" or "flex_attention" (`get_correct_attn_implementation`
# runs those backends' own checks on any name containing them), "paged|" (a prefix it strips), or "/"
# (`is_kernel`: a hub kernel repository).
ATTN_IMPLEMENTATION = "fa_triton"

if "flash" in ATTN_IMPLEMENTATION:   # the rule above, kept true by construction
    raise AssertionError("the registered name must not contain 'flash'")


# -- the mask function ------------------------------------------------------------------------------

# The mask functions of the plain patterns, which the attention function rebuilds from a 2D padding mask,
# its causal flag and the `sliding_window` keyword. transformers builds the sliding ones as
# `and_masks(overlay, base)` closures (masking_utils.sliding_window_causal_mask_function and
# sliding_window_bidirectional_mask_function); they are recognised by the overlay's qualified name and the
# base function itself. Anything not recognised (a later transformers that builds them otherwise
# included) takes the dense path, which is always correct.
# (transformers 4.x has no bidirectional mask functions: its encoders built their masks otherwise.)
bidirectional_mask_function = getattr(masking_utils, "bidirectional_mask_function", None)
_PLAIN = tuple(f for f in (causal_mask_function, bidirectional_mask_function) if f is not None)
_SLIDING_OVERLAYS = {
    "sliding_window_overlay.<locals>.inner_mask": causal_mask_function,
    "sliding_window_bidirectional_overlay.<locals>.inner_mask": bidirectional_mask_function,
}


def _is_plain(mask_function) -> bool:
    """Whether `mask_function` is causal or bidirectional, optionally with transformers' sliding window
    overlay, and nothing else (no packed-sequence remapping, no or/and overlays, no chunks)."""
    if any(mask_function is f for f in _PLAIN):
        return True
    code, closure = getattr(mask_function, "__code__", None), getattr(mask_function, "__closure__", None)
    if getattr(mask_function, "__qualname__", None) != "and_masks.<locals>.and_mask" or not closure:
        return False
    cells = dict(zip(code.co_freevars, closure))
    try:
        parts = cells["mask_functions"].cell_contents
    except (KeyError, ValueError):
        return False
    if not (isinstance(parts, tuple) and len(parts) == 2):
        return False
    overlay, base = parts
    return base is not None and _SLIDING_OVERLAYS.get(getattr(overlay, "__qualname__", None)) is base


def _unused_slots(kv_length: int, kwargs: dict) -> Tensor | None:
    """Without a padding mask: None, unless the layer's keys have slots past the tokens seen so far (a
    StaticCache: kv_length is its capacity), where an all-True mask as long as the tokens seen makes the
    attention function drop the rest (transformers' flash path attends to those slots: it returns None
    here). The tokens seen: q_offset + q_length (transformers >= 5.x, q_offset a tensor for a StaticCache)
    or the last cache_position + 1 (earlier), less kv_offset; one read from the device."""
    if torch.compiler.is_compiling():
        return None
    positions = kwargs.get("cache_position")
    if kwargs.get("q_length") is not None:
        end, device = int(kwargs.get("q_offset", 0)) + int(kwargs["q_length"]), kwargs.get("device")
    elif isinstance(positions, torch.Tensor) and positions.numel():
        end, device = int(positions[-1]) + 1, positions.device
    else:
        return None
    seen = end - int(kwargs.get("kv_offset", 0))
    if seen >= kv_length or device is None:
        return None
    return torch.ones(kwargs["batch_size"], seen, dtype=torch.bool, device=device)


def attention_mask_function(*, kv_length: int, mask_function=causal_mask_function,
                            attention_mask: Tensor | None = None, **kwargs):
    """The mask transformers builds for `attention_forward` (registered in `AttentionMaskInterface`).

    Plain patterns (causal, bidirectional, with or without a sliding window): the 2D bool key-padding mask
    (batch, <= kv_length), True = a real token, sliced from the right to the keys the layer sees, as
    transformers' `flash_attention_mask` does; None when every key is real. Anything else: transformers'
    dense 4D bool mask (batch, 1, q_length, kv_length), True = may attend (`sdpa_mask`, never skipped).

    transformers calls mask functions by keyword; the other keywords (batch_size, q_length, q_offset,
    kv_offset, ... in transformers 5; batch_size, cache_position, kv_offset, ... in 4.x) go to `sdpa_mask`
    unchanged.
    """
    if _is_plain(mask_function):
        if attention_mask is None:
            return _unused_slots(kv_length, kwargs)
        attention_mask = attention_mask[:, -kv_length:]
        # Shorter than kv_length only with a StaticCache (its unused slots): kept, so that the attention
        # function drops those slots.
        if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
            return None
        return attention_mask
    kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)   # always the mask itself
    return sdpa_mask(kv_length=kv_length, mask_function=mask_function, attention_mask=attention_mask, **kwargs)


# -- the attention function -------------------------------------------------------------------------

_warned_output_attentions = False

# Queries this short, in inference, with left padding, go through flash_attn_with_kvcache and its split-KV
# kernel (flash-decoding), the keys of each sequence starting at its padding's end (cache_leftpad): the
# packed (varlen) path would run the dense kernels with tiles of mostly empty query rows. The same bound
# as the Triton backend's own choice of that kernel (flashattn/ops/triton/choice.py, SPLIT_KV_MAX_QUERIES).
DECODE_MAX_QUERIES = 16


def _window(sliding_window, causal: bool) -> tuple[int, int]:
    """flash-attention's reading of transformers' `sliding_window` keyword (modeling_flash_attention_utils:
    `window_size = (sliding_window - 1, sliding_window - 1)`, the right side then cut to 0 by causal)."""
    if sliding_window is None:
        return (-1, -1)
    w = int(sliding_window)
    if w < 1:
        raise ValueError(f"sliding_window must be None or an int >= 1, got {sliding_window!r}")
    return (w - 1, 0 if causal else w - 1)


def _dense_mask(mask: Tensor, q: Tensor, seqlen_k: int) -> Tensor:
    """A 4D mask as attn_bias: bool (True = may attend), or an additive float mask in q's dtype or float32."""
    if mask.shape[-1] > seqlen_k:
        mask = mask[..., :seqlen_k]
    if mask.dtype != torch.bool and mask.dtype not in (q.dtype, torch.float32):
        mask = mask.to(torch.float32)
    return mask


def _cumulative(n_seq: int, length: int, device: torch.device) -> Tensor:
    return torch.arange(0, (n_seq + 1) * length, length, dtype=torch.int32, device=device)


def attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      sliding_window: int | None = None, softcap: float | None = None, is_causal: bool | None = None,
                      s_aux: Tensor | None = None, **kwargs) -> tuple[Tensor, None]:
    """transformers' attention-function signature over this library (registered in `AttentionInterface`).

    Args:
        module: the attention layer (read: `training`, `is_causal`).
        query: (batch, nheads, q_len, head_dim); key, value: (batch, nheads_k, kv_len, head_dim[_v]),
            nheads a multiple of nheads_k (transposed views are taken, nothing is repeated or copied).
        attention_mask: what `attention_mask_function` built: None, a 2D bool key-padding mask
            (batch, <= kv_len) (True = real; a shorter mask drops the keys past it: a StaticCache's unused
            slots), or a 4D mask broadcastable to (batch, nheads, q_len, kv_len), bool (True = may attend)
            or additive float, which alone then decides who attends to whom.
        dropout: attention dropout, applied while module.training (as eager's nn.functional.dropout).
        scaling: the softmax scale; None: 1 / sqrt(head_dim).
        sliding_window: w: query i sees keys i - w + 1 .. i (causal), i - w + 1 .. i + w - 1 (bidirectional).
        softcap: scores x become softcap * tanh(x / softcap) (Gemma 2).
        is_causal: None: module.is_causal (default True).
        s_aux: attention sinks: not implemented (NotImplementedError).
        kwargs: `position_bias`, an additive float bias broadcastable to (batch, nheads, q_len, kv_len)
            (T5's relative position buckets, MPT's ALiBi, ...: a gradient reaches it); `cu_seq_lens_q`,
            `cu_seq_lens_k`, `max_length_q`, `max_length_k` (packed sequences), `deterministic`; others
            (position_ids, the cache, ...) are not needed and ignored.

    Returns:
        (attn_output (batch, q_len, nheads, head_dim_v), None): the layout transformers' attention
        layers reshape to (batch, q_len, hidden), as its flash and SDPA functions return.
    """
    global _warned_output_attentions
    if s_aux is not None or kwargs.get("sinks") is not None:
        raise NotImplementedError(
            f"attention sinks (s_aux) are not implemented by attn_implementation={ATTN_IMPLEMENTATION!r} "
            f"(this model's attention layer {type(module).__name__} passes them); use attn_implementation='eager' "
            "or 'sdpa' for this model")
    if kwargs.get("output_attentions", False) and not _warned_output_attentions:
        _warned_output_attentions = True
        warnings.warn(f"attn_implementation={ATTN_IMPLEMENTATION!r} does not return attention weights "
                      "(output_attentions=True gives None); use attn_implementation='eager' for them", stacklevel=2)

    batch, _, q_len, head_dim = query.shape
    if key.dtype != query.dtype or value.dtype != query.dtype:
        key, value = key.to(query.dtype), value.to(query.dtype)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)   # (B, S, H, D) views
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(head_dim)
    # The kernels take one head dim for q, k and v: zero-pad the smaller side (zeros change no score and
    # no output column), crop the output back to v's head dim.
    head_dim_v = v.shape[-1]
    if head_dim_v < head_dim:
        v = F.pad(v, (0, head_dim - head_dim_v))
    elif head_dim_v > head_dim:
        q, k = F.pad(q, (0, head_dim_v - head_dim)), F.pad(k, (0, head_dim_v - head_dim))
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    dropout_p = float(dropout) if module.training else 0.0
    softcap = float(softcap) if softcap else 0.0
    deterministic = bool(kwargs.get("deterministic") or torch.are_deterministic_algorithms_enabled())
    options = dict(dropout_p=dropout_p, softmax_scale=scale, softcap=softcap, deterministic=deterministic)

    position_bias = kwargs.get("position_bias")
    if position_bias is not None:
        out = _with_position_bias(q, k, v, position_bias, attention_mask, causal, _window(sliding_window, causal),
                                  options)
    elif attention_mask is not None and attention_mask.dim() == 4:
        out = flash_attn_func(q, k, v, **options, attn_bias=_dense_mask(attention_mask, q, k.shape[1]))
    elif attention_mask is not None:
        out = _padded(q, k, v, attention_mask, causal, _window(sliding_window, causal), options)
    elif all(kwargs.get(n) is not None for n in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")):
        out = flash_attn_varlen_func(
            q.reshape(-1, *q.shape[2:]), k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:]),
            kwargs["cu_seq_lens_q"].to(torch.int32), kwargs["cu_seq_lens_k"].to(torch.int32),
            int(kwargs["max_length_q"]), int(kwargs["max_length_k"]), causal=causal,
            window_size=_window(sliding_window, causal), **options).view(batch, q_len, *q.shape[2:])
    else:
        out = flash_attn_func(q, k, v, causal=causal, window_size=_window(sliding_window, causal), **options)
    return (out[..., :head_dim_v] if out.shape[-1] != head_dim_v else out), None


def _with_position_bias(q: Tensor, k: Tensor, v: Tensor, position_bias: Tensor, mask: Tensor | None, causal: bool,
                        window: tuple[int, int], options: dict) -> Tensor:
    """Attention with a model's additive position bias (passed as `position_bias`, as T5 and MPT do):
    the bias is attn_bias, merged with the mask as SDPA's path merges them (-inf where a 4D bool or the
    key-padding mask forbids; a float mask added). Causal masking and windows stay the kernels' flags
    (bottom-right aligned) unless a 4D mask decides alone. The bias is expanded only where a padding
    mask must be merged into it; without one it is never expanded."""
    if position_bias.dtype not in (q.dtype, torch.float32):
        position_bias = position_bias.to(torch.float32)
    if mask is not None and mask.dim() == 4:
        mask = _dense_mask(mask, q, k.shape[1])
        bias = position_bias.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else (
            position_bias + mask)
        return flash_attn_func(q, k, v, **options, attn_bias=bias)
    if mask is not None:       # a key-padding mask, aligned to the keys as _padded aligns it
        if mask.shape[1] > k.shape[1]:
            mask = mask[:, -k.shape[1]:]
        elif mask.shape[1] < k.shape[1]:
            k, v, position_bias = k[:, :mask.shape[1]], v[:, :mask.shape[1]], position_bias[..., :mask.shape[1]]
        keep = mask if mask.dtype == torch.bool else mask != 0
        position_bias = position_bias.masked_fill(~keep[:, None, None, :], float("-inf"))
    return flash_attn_func(q, k, v, causal=causal, window_size=window, **options, attn_bias=position_bias)


def _padded(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, causal: bool, window: tuple[int, int],
            options: dict) -> Tensor:
    """A padded batch: pack the real keys (and queries), attend through the varlen path, pad back; or,
    for a few queries in inference against left-padded keys, the split-KV kernel with cache_leftpad.

    mask (batch, m): the key-padding mask, True = a real key. m > kv_len: its last kv_len columns are
    the keys'; m < kv_len: it covers the first m key slots, and the rest (a StaticCache's unused tail)
    are dropped. The queries are the last q_len tokens of the key sequence (self-attention, with or
    without a cache). Where the alignment matters (causal, or a window) the padded queries are dropped
    too, so that each sequence's real queries end where its real keys end and the bottom-right corner of
    its own scores is the right one, whatever the padding pattern; a single query (q_len == 1, a decoding
    step) is kept. Otherwise every query row is kept: it sees all the real keys of its row, as in eager,
    which is also right for cross-attention, whose queries the key mask says nothing about.
    """
    batch, q_len, nheads, head_dim = q.shape
    if mask.shape[1] > k.shape[1]:
        mask = mask[:, -k.shape[1]:]
    elif mask.shape[1] < k.shape[1]:
        k, v = k[:, :mask.shape[1]], v[:, :mask.shape[1]]
    kv_len = k.shape[1]
    mask = mask if mask.dtype == torch.bool else mask != 0
    if (q_len <= DECODE_MAX_QUERIES and options["dropout_p"] == 0.0 and k.stride(-1) == v.stride(-1) == 1
            and not (torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)))):
        # Left padding (every row's real keys contiguous at its end), as generation pads: one read of a flag.
        leftpad = kv_len - mask.sum(dim=1, dtype=torch.int32)                       # (B,)
        if bool((mask == (torch.arange(kv_len, device=mask.device) >= leftpad[:, None])).all()):
            return flash_attn_with_kvcache(q, k, v, cache_seqlens=kv_len, cache_leftpad=leftpad,
                                           softmax_scale=options["softmax_scale"], causal=causal, window_size=window,
                                           softcap=options["softcap"])
    k_packed, indices_k, cu_k, max_k, _ = unpad_input(k, mask)
    v_packed = index_first_axis(v.reshape(batch * kv_len, *v.shape[2:]), indices_k)
    aligned = causal or window != (-1, -1)
    indices_q = None
    if aligned and q_len == kv_len:
        q_packed, indices_q, cu_q, max_q = index_first_axis(q.reshape(batch * q_len, nheads, head_dim), indices_k), \
            indices_k, cu_k, max_k
    elif aligned and q_len > 1:
        q_packed, indices_q, cu_q, max_q, _ = unpad_input(q, mask[:, -q_len:])
    else:
        q_packed, cu_q, max_q = q.reshape(batch * q_len, nheads, head_dim), _cumulative(batch, q_len, q.device), q_len
    out = flash_attn_varlen_func(q_packed, k_packed, v_packed, cu_q, cu_k, max_q, max_k, causal=causal,
                                 window_size=window, **options)
    if indices_q is None:
        return out.view(batch, q_len, nheads, head_dim)
    return pad_input(out, indices_q, batch, q_len)


# -- registration -----------------------------------------------------------------------------------

def register(name: str = ATTN_IMPLEMENTATION) -> str:
    """Register `attention_forward` and `attention_mask_function` under `name` (done on import under
    ATTN_IMPLEMENTATION; call again for another name). Returns the name."""
    if "flash" in name or "sdpa" in name or "flex_attention" in name or "/" in name or name.startswith("paged|"):
        raise ValueError(f"{name!r}: transformers routes names containing 'flash', 'sdpa', 'flex_attention', '/' "
                         "or starting with 'paged|' to its own backends; choose another")
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, attention_mask_function)
    return name


register()
