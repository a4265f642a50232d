"""The FlashAttention paper's claims, measured on this library: `python -m flashattn.bench paper`.

Each claim of Dao et al. (2022) is a section; each section runs ours beside standard attention (the
paper's baseline, peers.standard_attention: matmul, softmax, matmul in PyTorch) and beside torch's
F.scaled_dot_product_attention, in the same process and the same run, and writes what it measured:

    exact    maximum error against float64, ours / standard / SDPA in the same dtype      exact.py
    io       HBM bytes read and written (Nsight Compute's DRAM counters) at the paper's
             Fig. 2 setting and across N, beside Theorem 2's IO model                     hbm.py, ncu.py
    memory   peak memory of forward + backward against N, plain and with dropout and a
             padding mask                                                                 memory.py
    speed    forward + backward time against N, plain and with dropout + padding mask     speed.py
    sparse   block-sparse speedup against density, beside the ideal 1 / density          sparse.py
    gpt2     GPT-2 small trained with each attention (examples/train_gpt2.py): tokens/s,
             step time, peak memory, loss curves; the longest context at batch 1          gpt2.py
    layer    flashattn.nn.FlashAttention's peak memory beside the same layer with
             standard attention and with SDPA                                             layer.py

common.py holds the three implementations (with the Fig. 3 options: dropout, a key-padding mask),
the number formats and the hardware facts the text compares; report.py turns the results
(paper.json) into paper.md and the PNGs; cli.py runs the sections.
Every section states the paper's claim, the figure measured here, and where the two differ and why,
phrased from the measurements. On a CPU the sections that can run do so at tiny sizes and the others
are marked skipped with the reason.
"""
