"""The layer example this project started from: FlashAttention(hidden_size=768, num_heads=12,
causal=True, dropout=0.1) on a (2, N, 768) input, its peak memory in training (forward + backward)
beside the same layer, with the same weights, attending with standard attention and with SDPA.

measure.peak_bytes of one `layer(x).backward(dout)` in training mode (dropout on), bf16 parameters
and input, after one warm-up call; the gradients of the input and the parameters are cleared before
the measured call, so each implementation allocates them there alike.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from flashattn.bench import measure
from flashattn.bench.cases import DTYPES
from flashattn.bench.paper import common
from flashattn.bench.paper.common import NAMES, OURS, SDPA, STANDARD
from flashattn.bench.peers import standard_attention
from flashattn.bench.report import markdown_table
from flashattn.nn import FlashAttention

KEY = "layer"
TITLE = "The layer: FlashAttention(hidden_size=768, num_heads=12, causal=True, dropout=0.1)"
CLAIM = ("This project's starting example: a drop-in attention layer whose training memory stays linear in "
         "the sequence length, against the same layer with standard attention, which keeps the (N, N) scores, "
         "probabilities and dropout mask of every head for the backward.")
GPU_ONLY = "it measures peak CUDA memory, and no GPU is in use"


@dataclass(frozen=True)
class Sizes:
    hidden: int = 768
    heads: int = 12
    batch: int = 2
    dropout: float = 0.1
    dtype: str = "bf16"
    seqlens: tuple[int, ...] = (512, 1024, 2048, 4096, 8192)
    example_seqlen: int = 2048


GPU = Sizes()


class OtherAttention(nn.Module):
    """`layer`'s projections (the same parameters, not copies) around standard attention or SDPA."""

    def __init__(self, layer: FlashAttention, attention: str):
        super().__init__()
        self.layer, self.attention = layer, attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        b, n, _ = x.shape
        qkv = layer.Wqkv(x).view(b, n, 3, layer.num_heads, layer.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                     # each (B, H, N, D)
        p = layer.dropout if self.training else 0.0
        if self.attention == STANDARD:
            out = standard_attention(q, k, v, causal=layer.causal, dropout_p=p)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=layer.causal)
        return layer.out_proj(out.transpose(1, 2).reshape(b, n, layer.hidden_size))


def run(ctx: common.Context) -> dict:
    sizes = GPU
    dtype = DTYPES[sizes.dtype]
    torch.manual_seed(0)
    layer = FlashAttention(hidden_size=sizes.hidden, num_heads=sizes.heads, causal=True, dropout=sizes.dropout,
                           device=ctx.device, dtype=dtype)
    modules = {OURS: layer, STANDARD: OtherAttention(layer, STANDARD), SDPA: OtherAttention(layer, SDPA)}
    for module in modules.values():
        module.train()
    rows = []
    for n in sizes.seqlens:
        ctx.log(f"N={common.seq(n)}")
        row = {"seqlen": n, "results": {}}
        for name, module in modules.items():
            try:
                x = torch.randn(sizes.batch, n, sizes.hidden, device=ctx.device, dtype=dtype, requires_grad=True)
                grad = torch.randn_like(x)
            except torch.cuda.OutOfMemoryError:
                row["results"][name] = {"status": "oom", "error": "out of memory"}
                continue

            def reset(x=x):
                x.grad = None
                layer.zero_grad(set_to_none=True)
            row["results"][name] = measure.peak_bytes(lambda m=module, x=x, g=grad: m(x).backward(g), ctx.device,
                                                      reset).as_dict()
            del x, grad
        rows.append(row)
    return {"sizes": asdict(sizes), "module": repr(layer), "rows": rows}


def ratio(row: dict, over: str) -> float | None:
    return common.over_ours(row["results"], over, "peak_bytes")


def markdown(data: dict, env: dict) -> str:
    sizes = data["sizes"]
    lines = [f"Measured: `{data['module']}` in training mode, {sizes['dtype']}, input ({sizes['batch']}, N, "
             f"{sizes['hidden']}); peak memory of one forward + backward beyond the parameters and the input, MiB "
             "(the input's and the parameters' gradients included).", ""]
    headers = ["N"] + [f"{n} layer MiB" for n in NAMES] + ["standard / ours", "SDPA / ours"]
    table = [[common.seq(r["seqlen"])]
             + [common.cell(r["results"][n], "peak_bytes", common.mib) for n in NAMES]
             + [common.times(ratio(r, STANDARD)), common.times(ratio(r, SDPA))] for r in data["rows"]]
    lines += markdown_table(headers, table, right=set(range(len(headers))))
    lines += ["", f"![the layer's peak memory]({KEY}.png)", ""]
    example = next((r for r in data["rows"] if r["seqlen"] == sizes["example_seqlen"]), None)
    text = "**Measured figure**: "
    if example is not None and ratio(example, STANDARD):
        r = example["results"]
        text += (f"on the ({sizes['batch']}, {sizes['example_seqlen']}, {sizes['hidden']}) input the layer takes "
                 f"{common.mib(r[OURS]['peak_bytes'])} MiB against {common.mib(r[STANDARD]['peak_bytes'])} MiB with "
                 f"standard attention ({common.times(ratio(example, STANDARD))} ours) and "
                 f"{common.mib(r[SDPA].get('peak_bytes'))} MiB with SDPA. ")
    ratios = [ratio(r, STANDARD) for r in data["rows"] if ratio(r, STANDARD)]
    if ratios:
        text += (f"Over N = {common.seq(sizes['seqlens'][0])} to {common.seq(sizes['seqlens'][-1])}, the layer with "
                 f"standard attention takes {common.range_text(ratios)} ours' memory.")
    slope = common.log_slope([r["seqlen"] for r in data["rows"] if r["results"][OURS].get("status") == "ok"],
                             [r["results"][OURS]["peak_bytes"] for r in data["rows"]
                              if r["results"][OURS].get("status") == "ok"])
    differ = ("**Where they differ and why**: not a figure of the paper. The layer's memory has a linear part that "
              "every implementation shares (the fused QKV projection's output, q, k, v, the output projection and "
              "their gradients, about 10 x N x 768 values per sequence) and a part that only standard attention has "
              "(the (12, N, N) scores, probabilities and dropout mask per sequence)")
    differ += f"; ours grows as N^{slope:.2f} over this range." if slope is not None else "."
    return "\n".join(lines + [text, "", differ]) + "\n"


def plot(data: dict, out: Path) -> list[str]:
    import matplotlib.pyplot as plt

    from flashattn.bench import plots
    colors = plots.colors_for(list(NAMES))
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for name in NAMES:
        pts = [(r["seqlen"], r["results"][name]["peak_bytes"] / 2 ** 20) for r in data["rows"]
               if r["results"][name].get("status") == "ok"]
        if pts:
            plots.line(ax, common.LABELS[name], *zip(*pts), colors[name], subject=name == OURS)
    plots.seqlen_axis(ax, [r["seqlen"] for r in data["rows"]])
    ax.set_yscale("log")
    ax.set_ylabel("peak training memory of the layer, MiB (log)")
    s = data["sizes"]
    ax.set_title(f"FlashAttention({s['hidden']}, {s['heads']}, causal, dropout {s['dropout']}) on ({s['batch']}, N, "
                 f"{s['hidden']})", fontsize=9)
    ax.legend(fontsize=8)
    return common.save(fig, out, KEY)
