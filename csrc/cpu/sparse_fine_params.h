// Plain-data interface between the torch-facing op (sparse_fine.cpp) and the ISA-specific kernels
// (sparse_fine_avx512bf16.cpp, sparse_fine_avx512.cpp, sparse_fine_avx2.cpp).
//
// Like bsr_params.h, this header stays free of torch / STL includes and of inline functions (the ISA
// files include it after `#pragma GCC target(...)`).
#pragma once
#include <stdint.h>

namespace sparsevit_cpu {

// Formulation (sparse weight x dense activation tile, tokens in the vector lanes):
//   * activations are packed per token tile of TT tokens as 32-bit words, word-major:
//       fp32: xp[tile][k][TT]          bf16: xp[tile][k/2][TT][2]  (a word = columns 2w, 2w+1)
//     zero-padded past T tokens and past `in` columns (up to Kp, a multiple of the unit width);
//   * each stored unit of output row o (U consecutive input columns, U in {1,2,4,8}) broadcasts its
//     weights (fp32: one scalar per column; bf16: one column pair per word, for vdpbf16ps) against
//     vectors of W tokens, accumulating an o x TT tile in fp32;
//   * the input dim is walked in chunks of `chunk` columns (seg[o][s] = first unit of row o in chunk
//     s), so one chunk of packed activations stays in L1 while every row of the range uses it; the
//     partial sums live in a per-thread scratch acc[row][TT] between chunks.
struct FineParams {
  const void* x;          // [T, ldx] fp32 or bf16 (bf16: ldx and the row start even, in words)
  int64_t ldx;            // in elements
  void* y;                // [T, ldy] same dtype as x
  int64_t ldy;
  const void* values;     // [nnz_units, U] same dtype as x
  const int32_t* col;     // [nnz_units] first column of each unit
  const int32_t* seg;     // [out, nseg + 1]
  const float* bias;      // [out] fp32, or nullptr
  void* xp;               // packed activation tiles, tile_words 32-bit words each
  int64_t xp_first_tile;  // tile whose packed words start at xp (0, or the tile of a one-tile buffer)
  uint8_t* bad_token;     // [n_tiles * TT] by token: 1 where it holds a NaN/Inf (pack writes it)
  const int64_t* tile_start;  // [n_tiles + 1] first token of each tile, multiples of the vector
                              // width, steps of at most TT tokens, tile_start[n_tiles] = T
  int64_t T, in, out;
  int64_t words_in;       // 32-bit words per token row of x that hold data (fp32: in, bf16: in/2)
  int64_t words_pad;      // words per packed token (fp32: Kp, bf16: Kp/2)
  int64_t tile_words;     // words_pad * TT
  int64_t n_tiles, nseg;
  int U, TT, chunk;       // chunk: input columns per segment
  int bf16;               // 0: fp32, 1: bf16
  int act;                // 0: none, 1: gelu (erf), 2: gelu (tanh)
};

struct FineKernels {
  const char* name;
  int vector_width;  // fp32 lanes per vector: TT is a multiple of it
  int token_tile;  // largest TT (tokens per packed tile) the kernels take: 8 vectors (AVX2: 4)
  int fp32_token_tile;  // TT a token_tile of 0 means for fp32 (bf16: token_tile)
  // Packs token tiles [tile_begin, tile_end) of x into p->xp and flags non-finite tokens.
  void (*pack)(const FineParams* p, int64_t tile_begin, int64_t tile_end);
  // y for token tile `tile` and output rows [row_begin, row_end); scratch holds
  // (row_end - row_begin) * TT floats, 64-byte aligned.
  void (*compute)(const FineParams* p, int64_t tile, int64_t row_begin, int64_t row_end, float* scratch);
  // Rows [row_begin, row_end) of tile `tile`, activation applied, written in the packed layout the
  // next layer reads (out = that tile's [words][TT] buffer) instead of y. bf16: row_begin even,
  // scratch as for compute (fp32 needs none: the partial sums live in out).
  void (*compute_packed)(const FineParams* p, int64_t tile, int64_t row_begin, int64_t row_end, void* out,
                         float* scratch);
  // True when any of the first `lanes` lanes of words [0, words) of a packed [words][TT] buffer is
  // NaN/Inf (bf16: either half of a word).
  bool (*any_nonfinite)(const float* buf, int64_t words, int TT, int lanes, int bf16);
};

const FineKernels* fine_kernels_avx512bf16();
const FineKernels* fine_kernels_avx512();
const FineKernels* fine_kernels_avx2();

}  // namespace sparsevit_cpu
