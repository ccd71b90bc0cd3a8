// Plain-data interface between the torch-facing op (bsr_linear.cpp) and the ISA-specific kernels
// (bsr_avx512bf16.cpp, bsr_avx512.cpp, bsr_avx2.cpp).
//
// This header must stay free of torch / STL includes and of inline functions: the ISA files include it
// after `#pragma GCC target(...)`, and any inline function defined here would be compiled for that
// ISA and could be picked by the linker for generic callers (an ODR trap on older CPUs).
#pragma once
#include <stdint.h>

namespace sparsevit_cpu {

// Packed-weight layout (built in Python, sparsevit/formats/bsr.py::pack_values):
//   fp32: packed[nnz][KP][BHP]        (KP = bw)                      -- W^T per block, rows padded
//   bf16: packed[nnz][KP/2][BHP][2]   (KP = bw rounded up to even)   -- k pairs interleaved (vdpbf16ps)
// BHP = bh if bh in {1,2,4,8}; next power of two if bh < 8; else bh rounded up to a multiple of 16.
// Activations: kernel A (BHP >= 16) broadcasts straight from row-major x, reading only the valid
// columns of a partial last block column (a copy only of the last partial token tile, or of all of x
// when its row stride aliases in L1); kernel B (BHP <= 8) reads a token-transposed pack built per call:
//   fp32: xp[tile][q][TT]          bf16: xp[tile][q/2][TT][2]     with q = c*KP + j (block col c, k j)
// Packed weight bytes a chunk of block rows may hold to stay in L2 while it is reused across token
// tiles (compute() in bsr_kernel_impl.h; the work split in bsr_linear.cpp). L2 is 1-2 MiB on current cores.
enum { kBsrL2WeightBudget = 512 * 1024 };
// Activation bytes of one token tile (all input columns) that stay in L1 (32-48 KiB) next to the
// streamed weights while one chunk of block rows runs over the tile: below it, kernel A prefetches
// the next block's activations only in the chunk's first row (later rows find them in L1, and the
// ~24 prefetches per block cost 2-3% at batch 1 on DeiT-S); above it (fc2, 1536 inputs) always.
enum { kBsrL1TileBudget = 24 * 1024 };
// How far ahead in the packed weight stream kernel A prefetches on a row chunk's first token tile
// (bsr_kernel_impl.h prefetch_weights): about one DRAM latency of column steps.
enum { kBsrWeightPrefetchAhead = 8192 };

struct BsrParams {
  const void* x;        // [T, ldx] fp32 or bf16
  int64_t ldx;
  void* y;              // [T, ldy] same dtype as x
  int64_t ldy;
  const void* wpack;    // packed weight (see above)
  const int32_t* col;   // [nnz] block column
  const int32_t* crow;  // [nbr + 1]
  const float* bias_pad;  // [nbr * BHP] fp32, zero in padded rows; nullptr when no bias
  void* xp;             // kernel B: transposed pack, n_tiles * tile_stride elements
  const void* xa;       // kernel A: row-major activations (x itself or a zero-padded copy)
  int64_t lda;          //   row stride of xa, in elements
  const void* xa_tail;  //   zero-padded copy of the last, partial token tile (nullptr if none)
  int64_t T, in, out, nbr, nbc;
  int bh, bw, BHP, KP, TT;
  int bf16;             // 0: fp32, 1: bf16
  int act;              // 0: none, 1: gelu (erf), 2: gelu (tanh)
  int64_t tile_stride;  // elements per packed token tile = nbc * KP * TT
  int64_t n_tiles;
  char* bad_tok;        // [T], zeroed by the caller; kernels set 1 where a token's output is not finite
};

struct BsrKernels {
  const char* name;
  // Tokens per register tile for a packed row height BHP (0 = unsupported -> caller falls back).
  int (*token_tile)(int BHP, int bf16);
  // Packs token tiles [tile_begin, tile_end) of x into p->xp.
  void (*pack)(const BsrParams* p, int64_t tile_begin, int64_t tile_end);
  // y rows of token tiles [tile_begin, tile_end) x block rows [row_begin, row_end).
  void (*compute)(const BsrParams* p, int64_t row_begin, int64_t row_end, int64_t tile_begin,
                  int64_t tile_end);
};

const BsrKernels* bsr_kernels_avx512bf16();
const BsrKernels* bsr_kernels_avx512();
const BsrKernels* bsr_kernels_avx2();

}  // namespace sparsevit_cpu
