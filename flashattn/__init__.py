"""flashattn: FlashAttention (exact, IO-aware attention) in Triton, with flash-attn 2.x's API."""
from flashattn.interface import flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func
from flashattn.kvcache import flash_attn_with_kvcache
from flashattn.sdpa import scaled_dot_product_attention
from flashattn.sparse import (BlockMask, butterfly_block_mask, local_global_block_mask,
                              strided_block_mask)
from flashattn.varlen import (flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                              flash_attn_varlen_qkvpacked_func)
from flashattn import nn   # the layers, flashattn.nn.FlashAttention / MultiheadAttention (last: they use the above)

__version__ = "0.1.0"

__all__ = ["flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache",
           "scaled_dot_product_attention",
           "BlockMask", "local_global_block_mask", "strided_block_mask", "butterfly_block_mask", "__version__"]
