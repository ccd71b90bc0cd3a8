// Where the time of one fine-grained sparse linear goes, without torch: the AVX-512 kernels of
// csrc/cpu/sparse_fine_impl.h driven directly on one synthetic layer (unstructured fp32 weight,
// 1x1 units, DeiT-S batch-8 shapes by default), one thread, thread CPU time, median of the reps.
// It splits a call into its parts (pack of x, the row kernel, the transposing store of y), which
// the torch op cannot, and builds in seconds, so variants of the kernel header can be compared
// without rebuilding the extension (build two binaries with different -D flags, run interleaved).
//
//   g++ -O3 -std=c++17 -I csrc/cpu bench/fine_kernel_probe.cpp -o /tmp/fine_probe
//   /tmp/fine_probe --in 384 --out 1152 --sparsity 0.9 --mode full --reps 15
//
// --mode full       pack + rows + store per token tile (what fine_linear runs, threads owning tiles)
//        pack       the pack alone
//        rows       pack + row kernel, no store
//        store      the store alone (into the whole y)
//        store-l2   the store alone into one tile's worth of y (stays in L2: the store's own cost)
// --hot-rows N      every output row reuses the units of row (o % N): the weights stay in L1, which
//                   shows what streaming them costs
// --rows-cap R      output rows per range (default as sparse_fine.cpp: 128 KiB of partial sums)
// --token-tile TT   tokens per packed tile (multiple of 16, up to 128; default 80 as the op)
// Prints the median ms, ns per FMA vector (stored units x token vectors) and a checksum of y (equal
// across variants that keep the summation order). Timings on a shared machine are indicative.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#define FINE_NS avx512
#define FINE_ENTRY fine_kernels_avx512
#define FINE_NAME "probe"
#define SPV_AVX512 1
#define SPV_NATIVE_BF16 0
#include "sparse_fine_impl.h"

#include <time.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

using sparsevit_cpu::FineParams;
namespace K = sparsevit_cpu::avx512;

double thread_seconds() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

struct Options {
  int in = 384, out = 1152, tokens = 1576, reps = 15, hot_rows = 0, rows_cap = 0, token_tile = 80;
  double sparsity = 0.9;
  std::string mode = "full";
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--in") o.in = std::stoi(v);
    else if (k == "--out") o.out = std::stoi(v);
    else if (k == "--tokens") o.tokens = std::stoi(v);
    else if (k == "--reps") o.reps = std::stoi(v);
    else if (k == "--hot-rows") o.hot_rows = std::stoi(v);
    else if (k == "--rows-cap") o.rows_cap = std::stoi(v);
    else if (k == "--token-tile") o.token_tile = std::stoi(v);
    else if (k == "--sparsity") o.sparsity = std::stod(v);
    else if (k == "--mode") o.mode = v;
    else { fprintf(stderr, "unknown option %s (see the header comment)\n", k.c_str()); exit(2); }
  }
  if (o.token_tile % 16 || o.token_tile < 16 || o.token_tile > 128) { fprintf(stderr, "bad --token-tile\n"); exit(2); }
  return o;
}

// An unstructured weight in the kernel's layout: units of each row in column order, segment
// pointers per 128-column chunk (as FineSparseWeight builds them).
struct Layer {
  std::vector<float> values;
  std::vector<int32_t> col, seg;
  int nseg;
};

Layer random_layer(const Options& o, std::mt19937& g) {
  std::uniform_real_distribution<float> u01(0.f, 1.f);
  const int chunk = 128;
  Layer L;
  L.nseg = (o.in + chunk - 1) / chunk;
  L.seg.resize((size_t)o.out * (L.nseg + 1));
  for (int r = 0; r < o.out; ++r) {
    for (int s = 0; s < L.nseg; ++s) {
      L.seg[r * (L.nseg + 1) + s] = (int32_t)L.col.size();
      for (int k = s * chunk; k < std::min(o.in, (s + 1) * chunk); ++k)
        if (u01(g) >= o.sparsity) {
          L.col.push_back(k);
          L.values.push_back(u01(g) - 0.5f);
        }
    }
    L.seg[r * (L.nseg + 1) + L.nseg] = (int32_t)L.col.size();
  }
  if (o.hot_rows > 0)  // rows reuse the first rows' units: every visit's weights come from L1
    for (int r = o.hot_rows; r < o.out; ++r)
      for (int s = 0; s <= L.nseg; ++s) L.seg[r * (L.nseg + 1) + s] = L.seg[(r % o.hot_rows) * (L.nseg + 1) + s];
  return L;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  std::mt19937 g(1);
  std::uniform_real_distribution<float> u01(0.f, 1.f);
  Layer L = random_layer(o, g);
  std::vector<float> x((size_t)o.tokens * o.in), y((size_t)o.tokens * o.out), bias(o.out, 0.1f);
  for (float& v : x) v = u01(g) - 0.5f;

  FineParams p{};
  p.x = x.data(); p.ldx = o.in; p.y = y.data(); p.ldy = o.out;
  p.values = L.values.data(); p.col = L.col.data(); p.seg = L.seg.data(); p.bias = bias.data();
  p.T = o.tokens; p.in = o.in; p.out = o.out; p.words_in = o.in; p.words_pad = o.in;
  p.TT = o.token_tile; p.tile_words = (int64_t)o.in * o.token_tile; p.nseg = L.nseg; p.U = 1; p.chunk = 128;
  const int64_t n_tiles = (o.tokens + p.TT - 1) / p.TT, n_vec = (o.tokens + 15) / 16;
  std::vector<int64_t> tile_start(n_tiles + 1);  // equal tiles, as sparse_fine.cpp plan_tiles
  for (int64_t i = 0; i < n_tiles; ++i) tile_start[i] = i * n_vec / n_tiles * 16;
  tile_start[n_tiles] = o.tokens;
  p.tile_start = tile_start.data();
  p.n_tiles = n_tiles;
  const int rows_cap = o.rows_cap > 0 ? o.rows_cap : std::max(16, (32768 / p.TT) / 16 * 16);
  float* xp = (float*)aligned_alloc(64, (size_t)p.tile_words * 4 * n_tiles);
  float* acc = (float*)aligned_alloc(64, (size_t)(rows_cap + 16) * p.TT * 4);
  memset(acc, 0, (size_t)(rows_cap + 16) * p.TT * 4);
  std::vector<uint8_t> bad(n_tiles * p.TT + 64);
  p.xp = xp;
  p.bad_token = bad.data();

  const sparsevit_cpu::FineKernels* k = sparsevit_cpu::fine_kernels_avx512();
  const bool do_pack = o.mode != "store" && o.mode != "store-l2";
  const bool do_rows = o.mode == "full" || o.mode == "rows";
  const bool do_store = o.mode == "full" || o.mode == "store" || o.mode == "store-l2";
  std::vector<double> times;
  for (int rep = 0; rep < o.reps; ++rep) {
    const double t0 = thread_seconds();
    for (int64_t tile = 0; tile < n_tiles; ++tile) {
      if (do_pack) k->pack(&p, tile, tile + 1);
      if (o.mode == "store-l2") p.y = y.data() - tile_start[tile] * o.out;  // every tile into rows [0, TT)
      const int tv = (int)((tile_start[tile + 1] - tile_start[tile] + 15) / 16);
      for (int r0 = 0; r0 < o.out; r0 += rows_cap) {
        const int r1 = std::min(o.out, r0 + rows_cap);
        if (do_rows) K::pick(1, tv, 0)(&p, tile, r0, r1, acc);
        if (do_store) K::store_tile(&p, tile, r0, r1, acc);
      }
    }
    times.push_back(thread_seconds() - t0);
  }
  std::sort(times.begin(), times.end());
  const double med = times[times.size() / 2];
  double units = 0, vectors = 0, checksum = 0;
  for (int r = 0; r < o.out; ++r) units += L.seg[r * (L.nseg + 1) + L.nseg] - L.seg[r * (L.nseg + 1)];
  for (int64_t t = 0; t < n_tiles; ++t) vectors += (double)((tile_start[t + 1] - tile_start[t] + 15) / 16);
  for (size_t i = 0; i < y.size(); i += 97) checksum += y[i];
  printf("%s in=%d out=%d tokens=%d sparsity=%.2f TT=%d: %.3f ms, %.3f ns per FMA vector, checksum %.6f\n",
         o.mode.c_str(), o.in, o.out, o.tokens, o.sparsity, p.TT, 1e3 * med, 1e9 * med / (units * vectors), checksum);
  free(xp);
  free(acc);
  return 0;
}
