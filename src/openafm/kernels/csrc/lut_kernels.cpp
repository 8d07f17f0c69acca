// Lookup-table (palettized) and int8-row matrix products for one-token and small-batch decode.
//
// Registered as PyTorch custom operators in the `openafm` namespace. Every operator has a
// pure-PyTorch reference in `openafm/kernels/reference.py`; the tests compare the two under each
// instruction set this CPU supports.
//
// Layout of a palettized weight (made by `openafm.kernels.repack`): rows are taken 4 at a time
// (a "tile") and columns 32 at a time (a "block"); for each tile and block the 4 rows' index
// bytes are contiguous, so one thread streams its rows front to back. One row's 32 indices of a
// block are stored as bit planes:
//   4-bit plane, 16 bytes: byte j = i[j] | i[j+16] << 4
//   2-bit plane,  8 bytes: byte j = i[j] | i[j+8] << 2 | i[j+16] << 4 | i[j+24] << 6
//   1-bit plane,  4 bytes: bit j of a little-endian uint32 = i[j]
// 2 bits = one 2-bit plane; 3 bits = 2-bit plane (bits 0-1) + 1-bit plane (bit 2);
// 4 bits = one 4-bit plane; 6 bits = 4-bit plane (bits 0-3) + 2-bit plane (bits 4-5).
// Tables are float32, one per group of rows, 2^bits entries; row scales are float32. The `fast`
// mode adds int8 tables for 4-bit weights (see lut4_q8_tile512).
//
// The code for each instruction set is compiled with a `target` attribute and chosen at run time
// from the CPU's flags, so one library runs on any x86-64 CPU (and the portable path elsewhere).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <vector>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) || defined(_M_X64)
#define OPENAFM_X86 1
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kRows = 4;    // rows per tile
constexpr int64_t kBlock = 32;  // columns per block
constexpr int64_t kMaxChunk = 4;  // activation rows computed together
constexpr int64_t kPrefetchRows = 16;  // int8 rows: fetch this many rows ahead

enum Isa : int64_t { kBest = 0, kPortable = 1, kAvx2 = 2, kAvx512 = 3 };

bool cpu_has_avx2() {
#ifdef OPENAFM_X86
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#ifdef OPENAFM_X86
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

bool cpu_has_avx512_vnni() {
#ifdef OPENAFM_X86
  return cpu_has_avx512() && __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

// Whether the chosen path has VNNI integer dot products (the int8 head's and the int8 tables').
bool vnni_path(int64_t isa) { return isa == kAvx512 && cpu_has_avx512_vnni(); }

int64_t best_isa() {
  if (cpu_has_avx512()) return kAvx512;
  if (cpu_has_avx2()) return kAvx2;
  return kPortable;
}

int64_t resolve(int64_t isa) {
  if (isa == kBest) return best_isa();
  TORCH_CHECK(isa >= kPortable && isa <= kAvx512, "unknown instruction set ", isa);
  TORCH_CHECK(isa != kAvx512 || cpu_has_avx512(), "this CPU has no AVX-512 (F/BW/VL/DQ)");
  TORCH_CHECK(isa != kAvx2 || cpu_has_avx2(), "this CPU has no AVX2+FMA");
  return isa;
}

int64_t block_bytes(int64_t bits) { return 4 * bits; }  // one row's 32 indices

bool supported_bits(int64_t bits) { return bits == 2 || bits == 3 || bits == 4 || bits == 6; }

// What every product needs to know about one palettized weight.
struct Lut {
  const uint8_t* planes;
  const float* tables;
  const float* scale;  // may be null
  int64_t bits, group, rows, tiles, blocks;
  // Optional int8 tables (4 bits): per group 16 bytes, entry + 128 as unsigned, and the
  // group's float scale; products then run on integer dot products (see lut4_q8_tile512).
  const uint8_t* tables8 = nullptr;
  const float* table_scale = nullptr;

  const uint8_t* block(int64_t tile, int64_t blk) const {
    return planes + (tile * blocks + blk) * kRows * block_bytes(bits);
  }
  const float* table(int64_t row) const { return tables + (row / group) * (int64_t{1} << bits); }
  float row_scale(int64_t row) const { return scale ? scale[row] : 1.0f; }
};

// Activations: `m` rows of `k` floats (k a multiple of 32), row stride `ld`.
struct Acts {
  const float* data;
  int64_t m, ld;
  // The same rows rounded to int16 per row (scale `xs`), split into signed bytes
  // (q = 256·hi + lo, `ldb` per row) with their sums (Σlo, Σhi per row): for integer kernels.
  const int8_t* lo = nullptr;
  const int8_t* hi = nullptr;
  int64_t ldb = 0;
  const int32_t* sums = nullptr;
  const float* xs = nullptr;
};

// ---- portable ------------------------------------------------------------------------------

void decode_block(const uint8_t* p, int64_t bits, uint8_t* idx) {
  switch (bits) {
    case 2:
    case 3:
      for (int j = 0; j < 8; ++j) {
        const uint8_t b = p[j];
        idx[j] = b & 3;
        idx[j + 8] = (b >> 2) & 3;
        idx[j + 16] = (b >> 4) & 3;
        idx[j + 24] = b >> 6;
      }
      if (bits == 3) {
        for (int j = 0; j < 32; ++j) idx[j] |= ((p[8 + j / 8] >> (j % 8)) & 1) << 2;
      }
      break;
    case 4:
    case 6:
      for (int j = 0; j < 16; ++j) {
        idx[j] = p[j] & 15;
        idx[j + 16] = p[j] >> 4;
      }
      if (bits == 6) {
        for (int j = 0; j < 8; ++j) {
          const uint8_t b = p[16 + j];
          idx[j] |= (b & 3) << 4;
          idx[j + 8] |= ((b >> 2) & 3) << 4;
          idx[j + 16] |= ((b >> 4) & 3) << 4;
          idx[j + 24] |= (b >> 6) << 4;
        }
      }
      break;
  }
}

void lut_tiles_portable(const Lut& w, const Acts& x, float* y, int64_t ldy, int64_t t0,
                        int64_t t1) {
  const int64_t bb = block_bytes(w.bits);
  uint8_t idx[kBlock];
  float vals[kBlock];
  for (int64_t tile = t0; tile < t1; ++tile) {
    for (int64_t r = 0; r < kRows; ++r) {
      const int64_t row = tile * kRows + r;
      if (row >= w.rows) break;
      const float* table = w.table(row);
      float acc[kMaxChunk * 4] = {};
      for (int64_t m0 = 0; m0 < x.m; m0 += kMaxChunk * 4) {
        const int64_t mc = std::min<int64_t>(kMaxChunk * 4, x.m - m0);
        std::fill(acc, acc + mc, 0.0f);
        for (int64_t blk = 0; blk < w.blocks; ++blk) {
          decode_block(w.block(tile, blk) + r * bb, w.bits, idx);
          for (int j = 0; j < kBlock; ++j) vals[j] = table[idx[j]];
          for (int64_t m = 0; m < mc; ++m) {
            const float* xv = x.data + (m0 + m) * x.ld + blk * kBlock;
            float s = 0.0f;
            for (int j = 0; j < kBlock; ++j) s += vals[j] * xv[j];
            acc[m] += s;
          }
        }
        for (int64_t m = 0; m < mc; ++m) y[(m0 + m) * ldy + row] = acc[m] * w.row_scale(row);
      }
    }
  }
}

void int8_rows_portable(const int8_t* v, const float* scale, int64_t k, const Acts& x, float* y,
                        int64_t ldy, int64_t r0, int64_t r1) {
  for (int64_t row = r0; row < r1; ++row) {
    const int8_t* vr = v + row * k;
    for (int64_t m = 0; m < x.m; ++m) {
      const float* xv = x.data + m * x.ld;
      float s = 0.0f;
      for (int64_t j = 0; j < k; ++j) s += static_cast<float>(vr[j]) * xv[j];
      y[m * ldy + row] = s * scale[row];
    }
  }
}

#ifdef OPENAFM_X86

// ---- AVX-512 -------------------------------------------------------------------------------

#define OPENAFM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

OPENAFM_AVX512 inline float hsum512(__m512 v) { return _mm512_reduce_add_ps(v); }

// A table in registers: 16 entries (2-4 bits, smaller tables repeated so stray high index
// bits select a copy of the same entry) or 64 entries (6 bits) in four registers.
template <int BITS>
struct Table512 {
  __m512 t[BITS == 6 ? 4 : 1];
};

template <int BITS>
OPENAFM_AVX512 inline Table512<BITS> load_table512(const float* table) {
  Table512<BITS> r;
  if constexpr (BITS == 6) {
    for (int i = 0; i < 4; ++i) r.t[i] = _mm512_loadu_ps(table + 16 * i);
  } else {
    const __m512i wrap = _mm512_and_si512(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32((1 << BITS) - 1));
    const __m512 raw = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << (1 << BITS)) - 1), table);
    r.t[0] = _mm512_permutexvar_ps(wrap, raw);
  }
  return r;
}

// One row's 32 weights of a block as two vectors (columns 0-15 and 16-31) of table values.
template <int BITS>
OPENAFM_AVX512 inline void lookup512(const uint8_t* p, const Table512<BITS>& t, __m512& w0,
                                     __m512& w1) {
  if constexpr (BITS == 4) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    w0 = _mm512_permutexvar_ps(v, t.t[0]);
    w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), t.t[0]);
  } else if constexpr (BITS == 2 || BITS == 3) {
    uint64_t bytes;
    std::memcpy(&bytes, p, 8);
    const __m512i v = _mm512_cvtepu8_epi32(_mm_set1_epi64x(static_cast<long long>(bytes)));
    const __m512i s01 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
    const __m512i s23 = _mm512_add_epi32(s01, _mm512_set1_epi32(4));
    __m512i i0 = _mm512_srlv_epi32(v, s01);
    __m512i i1 = _mm512_srlv_epi32(v, s23);
    if constexpr (BITS == 3) {
      uint32_t hi;
      std::memcpy(&hi, p + 8, 4);
      const __m512i three = _mm512_set1_epi32(3), four = _mm512_set1_epi32(4);
      i0 = _mm512_and_si512(i0, three);
      i1 = _mm512_and_si512(i1, three);
      i0 = _mm512_mask_or_epi32(i0, static_cast<__mmask16>(hi), i0, four);
      i1 = _mm512_mask_or_epi32(i1, static_cast<__mmask16>(hi >> 16), i1, four);
    }
    w0 = _mm512_permutexvar_ps(i0, t.t[0]);
    w1 = _mm512_permutexvar_ps(i1, t.t[0]);
  } else {  // 6 bits
    const __m512i lo = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    uint64_t bytes;
    std::memcpy(&bytes, p + 16, 8);
    const __m512i v = _mm512_cvtepu8_epi32(_mm_set1_epi64x(static_cast<long long>(bytes)));
    const __m512i s01 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
    const __m512i s23 = _mm512_add_epi32(s01, _mm512_set1_epi32(4));
    const __m512i three = _mm512_set1_epi32(3), fifteen = _mm512_set1_epi32(15);
    const __m512i h0 = _mm512_slli_epi32(_mm512_and_si512(_mm512_srlv_epi32(v, s01), three), 4);
    const __m512i h1 = _mm512_slli_epi32(_mm512_and_si512(_mm512_srlv_epi32(v, s23), three), 4);
    const __m512i i0 = _mm512_or_si512(_mm512_and_si512(lo, fifteen), h0);
    const __m512i i1 = _mm512_or_si512(_mm512_srli_epi32(lo, 4), h1);
    const __m512i bit5 = _mm512_set1_epi32(32);
    w0 = _mm512_mask_blend_ps(_mm512_test_epi32_mask(i0, bit5),
                              _mm512_permutex2var_ps(t.t[0], i0, t.t[1]),
                              _mm512_permutex2var_ps(t.t[2], i0, t.t[3]));
    w1 = _mm512_mask_blend_ps(_mm512_test_epi32_mask(i1, bit5),
                              _mm512_permutex2var_ps(t.t[0], i1, t.t[1]),
                              _mm512_permutex2var_ps(t.t[2], i1, t.t[3]));
  }
}

// `MC` activation rows against one tile (4 rows) of the weight.
template <int BITS, int MC>
OPENAFM_AVX512 void lut_tile512(const Lut& w, const float* x, int64_t ldx, float* y, int64_t ldy,
                                int64_t tile) {
  constexpr int64_t bb = 4 * BITS;
  Table512<BITS> tab[kRows];
  for (int64_t r = 0; r < kRows; ++r) {
    tab[r] = load_table512<BITS>(w.table(std::min(tile * kRows + r, w.rows - 1)));
  }
  __m512 acc[kRows][MC];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  for (int64_t blk = 0; blk < w.blocks; ++blk) {
    const uint8_t* p = w.block(tile, blk);
    _mm_prefetch(reinterpret_cast<const char*>(p + 32 * kRows * bb), _MM_HINT_T0);
    __m512 x0[MC], x1[MC];
    for (int m = 0; m < MC; ++m) {
      x0[m] = _mm512_loadu_ps(x + m * ldx + blk * kBlock);
      x1[m] = _mm512_loadu_ps(x + m * ldx + blk * kBlock + 16);
    }
    for (int64_t r = 0; r < kRows; ++r) {
      __m512 w0, w1;
      lookup512<BITS>(p + r * bb, tab[r], w0, w1);
      for (int m = 0; m < MC; ++m) {
        acc[r][m] = _mm512_fmadd_ps(w0, x0[m], acc[r][m]);
        acc[r][m] = _mm512_fmadd_ps(w1, x1[m], acc[r][m]);
      }
    }
  }
  for (int64_t r = 0; r < kRows; ++r) {
    const int64_t row = tile * kRows + r;
    if (row >= w.rows) break;
    const float s = w.row_scale(row);
    for (int m = 0; m < MC; ++m) y[m * ldy + row] = hsum512(acc[r][m]) * s;
  }
}

template <int BITS>
OPENAFM_AVX512 void lut_tiles512(const Lut& w, const Acts& x, float* y, int64_t ldy, int64_t t0,
                                 int64_t t1) {
  for (int64_t tile = t0; tile < t1; ++tile) {
    int64_t m0 = 0;
    for (; m0 + 4 <= x.m; m0 += 4)
      lut_tile512<BITS, 4>(w, x.data + m0 * x.ld, x.ld, y + m0 * ldy, ldy, tile);
    switch (x.m - m0) {
      case 3: lut_tile512<BITS, 3>(w, x.data + m0 * x.ld, x.ld, y + m0 * ldy, ldy, tile); break;
      case 2: lut_tile512<BITS, 2>(w, x.data + m0 * x.ld, x.ld, y + m0 * ldy, ldy, tile); break;
      case 1: lut_tile512<BITS, 1>(w, x.data + m0 * x.ld, x.ld, y + m0 * ldy, ldy, tile); break;
      default: break;
    }
  }
}

// One tile's rows of the dense matrix (row-major, `cols` wide): table value times row scale.
template <int BITS>
OPENAFM_AVX512 void dequantize_tile512(const Lut& w, int64_t tile, int64_t cols, float* dst) {
  constexpr int64_t bb = 4 * BITS;
  for (int64_t r = 0; r < kRows; ++r) {
    const int64_t row = tile * kRows + r;
    if (row >= w.rows) break;
    const Table512<BITS> tab = load_table512<BITS>(w.table(row));
    const __m512 s = _mm512_set1_ps(w.row_scale(row));
    float* d = dst + row * cols;
    for (int64_t blk = 0; blk < w.blocks; ++blk) {
      __m512 w0, w1;
      lookup512<BITS>(w.block(tile, blk) + r * bb, tab, w0, w1);
      const int64_t c = blk * kBlock, n = std::min<int64_t>(kBlock, cols - c);
      if (n == kBlock) {
        _mm512_storeu_ps(d + c, _mm512_mul_ps(w0, s));
        _mm512_storeu_ps(d + c + 16, _mm512_mul_ps(w1, s));
      } else {
        alignas(64) float tmp[kBlock];
        _mm512_store_ps(tmp, _mm512_mul_ps(w0, s));
        _mm512_store_ps(tmp + 16, _mm512_mul_ps(w1, s));
        std::copy_n(tmp, n, d + c);
      }
    }
  }
}

template <int MC>
OPENAFM_AVX512 void int8_rows512_chunk(const int8_t* v, const float* scale, int64_t k,
                                       const float* x, int64_t ldx, float* y, int64_t ldy,
                                       int64_t row) {
  __m512 acc[kRows][MC];
  for (auto& r : acc)
    for (auto& a : r) a = _mm512_setzero_ps();
  const int64_t k16 = k / 16 * 16;
  for (int64_t r = 0; r < kRows; ++r) {  // row by row: the tile's bytes front to back
    for (int64_t j = 0; j < k; j += 16) {
      const __mmask16 mask = j < k16 ? 0xFFFF : static_cast<__mmask16>((1u << (k - j)) - 1);
      const int8_t* src = v + (row + r) * k + j;
      if (j % 64 == 0)
        _mm_prefetch(reinterpret_cast<const char*>(src + kPrefetchRows * k), _MM_HINT_T0);
      const __m128i b = j < k16 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(src))
                                : _mm_maskz_loadu_epi8(mask, src);
      const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
      for (int m = 0; m < MC; ++m)
        acc[r][m] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mask, x + m * ldx + j), acc[r][m]);
    }
  }
  for (int64_t r = 0; r < kRows; ++r)
    for (int m = 0; m < MC; ++m) y[m * ldy + row + r] = hsum512(acc[r][m]) * scale[row + r];
}


// int8 rows against activations quantized to int16 (one scale per activation row): 32 products
// per instruction, summed exactly in int32 (so `k` ≤ kMaxQuantCols), scaled once per row.
template <int MC>
OPENAFM_AVX512 void int8_rows512_q_chunk(const int8_t* v, const float* scale, int64_t k,
                                         const int16_t* xq, int64_t ldq, const float* xs,
                                         float* y, int64_t ldy, int64_t row) {
  __m512i acc[kRows][MC];
  for (auto& r : acc)
    for (auto& a : r) a = _mm512_setzero_si512();
  for (int64_t r = 0; r < kRows; ++r) {  // row by row: the tile's bytes front to back
    for (int64_t j = 0; j < k; j += 32) {
      const __mmask32 mask =
          k - j >= 32 ? 0xFFFFFFFFu : static_cast<__mmask32>((1ull << (k - j)) - 1);
      const int8_t* src = v + (row + r) * k + j;
      if (j % 64 == 0)
        _mm_prefetch(reinterpret_cast<const char*>(src + kPrefetchRows * k), _MM_HINT_T0);
      const __m256i b = mask == 0xFFFFFFFFu
                            ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src))
                            : _mm256_maskz_loadu_epi8(mask, src);
      const __m512i wv = _mm512_cvtepi8_epi16(b);
      for (int m = 0; m < MC; ++m)
        acc[r][m] = _mm512_add_epi32(acc[r][m],
                                     _mm512_madd_epi16(wv, _mm512_loadu_si512(xq + m * ldq + j)));
    }
  }
  for (int64_t r = 0; r < kRows; ++r)
    for (int m = 0; m < MC; ++m)
      y[m * ldy + row + r] =
          static_cast<float>(_mm512_reduce_add_epi32(acc[r][m])) * xs[m] * scale[row + r];
}

#define OPENAFM_AVX512_VNNI \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma")))

// The sums of four vectors' lanes, as the four lanes of one 128-bit vector.
OPENAFM_AVX512_VNNI inline __m128i sum_four512(const __m512i v[4]) {
  const __m512i t01 = _mm512_add_epi32(_mm512_unpacklo_epi32(v[0], v[1]),
                                       _mm512_unpackhi_epi32(v[0], v[1]));
  const __m512i t23 = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2], v[3]),
                                       _mm512_unpackhi_epi32(v[2], v[3]));
  const __m512i t = _mm512_add_epi32(_mm512_unpacklo_epi64(t01, t23),
                                     _mm512_unpackhi_epi64(t01, t23));
  const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(t), _mm512_extracti64x4_epi64(t, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

// Activations quantized to int16 as above, split into a signed low byte and a high byte
// (q = 256·hi + lo): two VNNI `vpdpbusd` per 64 weights instead of four instructions per 32.
// `vpdpbusd` multiplies unsigned by signed bytes, so the weights are made unsigned (w ^ 0x80 =
// w + 128); that adds 128·Σlo and 128·Σhi, which `sums` (Σlo, Σhi per activation row) take
// back. The total is the same integer as the int16 path's, so the result is the same.
template <int MC>
OPENAFM_AVX512_VNNI void int8_rows512_vnni_chunk(const int8_t* v, const float* scale, int64_t k,
                                                 const int8_t* lo, const int8_t* hi, int64_t ldb,
                                                 const int32_t* sums, const float* xs, float* y,
                                                 int64_t ldy, int64_t row) {
  __m512i acc_lo[kRows][MC], acc_hi[kRows][MC];
  for (int64_t r = 0; r < kRows; ++r)
    for (int m = 0; m < MC; ++m) acc_lo[r][m] = acc_hi[r][m] = _mm512_setzero_si512();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  // Row by row: the tile's bytes are read front to back (the activations stay in L1).
  for (int64_t r = 0; r < kRows; ++r) {
    const int8_t* src_row = v + (row + r) * k;
    for (int64_t j = 0; j < k; j += 64) {
      const bool full = k - j >= 64;
      const __mmask64 mask = full ? ~0ull : (1ull << (k - j)) - 1;
      const int8_t* src = src_row + j;
      _mm_prefetch(reinterpret_cast<const char*>(src + kPrefetchRows * k), _MM_HINT_T0);
      const __m512i raw = full ? _mm512_loadu_si512(src) : _mm512_maskz_loadu_epi8(mask, src);
      const __m512i w = _mm512_xor_si512(raw, flip);
      for (int m = 0; m < MC; ++m) {
        acc_lo[r][m] = _mm512_dpbusd_epi32(acc_lo[r][m], w, _mm512_loadu_si512(lo + m * ldb + j));
        acc_hi[r][m] = _mm512_dpbusd_epi32(acc_hi[r][m], w, _mm512_loadu_si512(hi + m * ldb + j));
      }
    }
  }
  // Per lane |lo part| ≤ 4·255·128·16 and |hi part| ≤ 4·255·64·16 (k ≤ kMaxQuantCols), so
  // lo + 256·hi stays inside int32; the four rows are then summed together.
  for (int m = 0; m < MC; ++m) {
    __m512i total[kRows];
    for (int64_t r = 0; r < kRows; ++r)
      total[r] = _mm512_add_epi32(acc_lo[r][m], _mm512_slli_epi32(acc_hi[r][m], 8));
    alignas(16) int32_t sum4[kRows];
    _mm_store_si128(reinterpret_cast<__m128i*>(sum4), sum_four512(total));
    const int64_t offset = int64_t{128} * (sums[2 * m] + int64_t{256} * sums[2 * m + 1]);
    for (int64_t r = 0; r < kRows; ++r)
      y[m * ldy + row + r] = static_cast<float>(sum4[r] - offset) * xs[m] * scale[row + r];
  }
}

// 16 bytes repeated in the four 128-bit lanes.
OPENAFM_AVX512_VNNI inline __m512i every_lane(const int8_t* src) {
  return _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
}

// 4-bit weights with int8 tables against the int16 activations' bytes: per block, each row's
// 32 indices are looked up with one `vpshufb` per 16 (the four rows of a tile are the four
// 128-bit lanes, each with its row's table) and multiplied with two `vpdpbusd` per half. The
// integer total is exact; the table entries carry the only rounding (to 8 bits of their range).
template <int MC>
OPENAFM_AVX512_VNNI void lut4_q8_tile512(const Lut& w, const Acts& x, float* y, int64_t ldy,
                                         int64_t tile) {
  alignas(64) uint8_t lanes[64];
  for (int64_t r = 0; r < kRows; ++r) {
    const int64_t row = std::min(tile * kRows + r, w.rows - 1);
    std::memcpy(lanes + 16 * r, w.tables8 + (row / w.group) * 16, 16);
  }
  const __m512i tab = _mm512_load_si512(lanes);
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512i acc_lo[MC], acc_hi[MC];
  for (int m = 0; m < MC; ++m) acc_lo[m] = acc_hi[m] = _mm512_setzero_si512();
  for (int64_t blk = 0; blk < w.blocks; ++blk) {
    const uint8_t* p = w.block(tile, blk);
    _mm_prefetch(reinterpret_cast<const char*>(p + 32 * 64), _MM_HINT_T0);
    const __m512i v = _mm512_loadu_si512(p);
    const __m512i w0 = _mm512_shuffle_epi8(tab, _mm512_and_si512(v, nibble));
    const __m512i w1 = _mm512_shuffle_epi8(tab, _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble));
    for (int m = 0; m < MC; ++m) {
      const int8_t* lo = x.lo + m * x.ldb + blk * kBlock;
      const int8_t* hi = x.hi + m * x.ldb + blk * kBlock;
      acc_lo[m] = _mm512_dpbusd_epi32(acc_lo[m], w0, every_lane(lo));
      acc_lo[m] = _mm512_dpbusd_epi32(acc_lo[m], w1, every_lane(lo + 16));
      acc_hi[m] = _mm512_dpbusd_epi32(acc_hi[m], w0, every_lane(hi));
      acc_hi[m] = _mm512_dpbusd_epi32(acc_hi[m], w1, every_lane(hi + 16));
    }
  }
  for (int m = 0; m < MC; ++m) {
    alignas(64) int32_t lo[16], hi[16];
    _mm512_store_si512(lo, acc_lo[m]);
    _mm512_store_si512(hi, acc_hi[m]);
    for (int64_t r = 0; r < kRows; ++r) {
      const int64_t row = tile * kRows + r;
      if (row >= w.rows) break;
      int64_t low = -int64_t{128} * x.sums[2 * m], high = -int64_t{128} * x.sums[2 * m + 1];
      for (int d = 0; d < 4; ++d) {
        low += lo[4 * r + d];
        high += hi[4 * r + d];
      }
      y[m * ldy + row] = static_cast<float>(low + 256 * high) * x.xs[m] *
                         w.table_scale[row / w.group] * w.row_scale(row);
    }
  }
}

OPENAFM_AVX512_VNNI void lut4_q8_tiles512(const Lut& w, const Acts& x, float* y, int64_t ldy,
                                          int64_t t0, int64_t t1) {
  for (int64_t tile = t0; tile < t1; ++tile) {
    int64_t m0 = 0;
    for (; m0 + 4 <= x.m; m0 += 4) {
      const Acts xm{x.data, 4, x.ld, x.lo + m0 * x.ldb, x.hi + m0 * x.ldb, x.ldb,
                    x.sums + 2 * m0, x.xs + m0};
      lut4_q8_tile512<4>(w, xm, y + m0 * ldy, ldy, tile);
    }
    for (; m0 < x.m; ++m0) {
      const Acts xm{x.data, 1, x.ld, x.lo + m0 * x.ldb, x.hi + m0 * x.ldb, x.ldb,
                    x.sums + 2 * m0, x.xs + m0};
      lut4_q8_tile512<1>(w, xm, y + m0 * ldy, ldy, tile);
    }
  }
}

OPENAFM_AVX512 void int8_rows512(const int8_t* v, const float* scale, int64_t k, const Acts& x,
                                 float* y, int64_t ldy, int64_t r0, int64_t r1) {
  int64_t row = r0;
  for (; row + kRows <= r1; row += kRows) {
    int64_t m0 = 0;
    for (; m0 + 4 <= x.m; m0 += 4)
      int8_rows512_chunk<4>(v, scale, k, x.data + m0 * x.ld, x.ld, y + m0 * ldy, ldy, row);
    for (; m0 < x.m; ++m0)
      int8_rows512_chunk<1>(v, scale, k, x.data + m0 * x.ld, x.ld, y + m0 * ldy, ldy, row);
  }
  if (row < r1) int8_rows_portable(v, scale, k, x, y, ldy, row, r1);
}

// ---- AVX2 ----------------------------------------------------------------------------------

#define OPENAFM_AVX2 __attribute__((target("avx2,fma")))

OPENAFM_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Tables: up to 3 bits in one register (smaller tables repeated), 4 bits in two, 6 bits gathered.
template <int BITS>
struct Table256 {
  __m256 t[BITS == 4 ? 2 : 1];
  const float* mem;
};

template <int BITS>
OPENAFM_AVX2 inline Table256<BITS> load_table256(const float* table) {
  Table256<BITS> r;
  r.mem = table;
  if constexpr (BITS == 4) {
    r.t[0] = _mm256_loadu_ps(table);
    r.t[1] = _mm256_loadu_ps(table + 8);
  } else if constexpr (BITS <= 3) {
    const __m256i wrap = _mm256_and_si256(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                          _mm256_set1_epi32((1 << BITS) - 1));
    float tmp[8] = {};
    std::memcpy(tmp, table, sizeof(float) << BITS);
    r.t[0] = _mm256_permutevar8x32_ps(_mm256_loadu_ps(tmp), wrap);
  } else {
    r.t[0] = _mm256_setzero_ps();
  }
  return r;
}

template <int BITS>
OPENAFM_AVX2 inline __m256 lookup256(__m256i i, const Table256<BITS>& t) {
  if constexpr (BITS == 4) {
    const __m256 lo = _mm256_permutevar8x32_ps(t.t[0], i);
    const __m256 hi = _mm256_permutevar8x32_ps(t.t[1], i);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(i, 28)));
  } else if constexpr (BITS <= 3) {
    return _mm256_permutevar8x32_ps(t.t[0], i);
  } else {
    return _mm256_i32gather_ps(t.mem, i, 4);
  }
}

// One row's 32 weights of a block as four vectors: columns 0-7, 8-15, 16-23, 24-31.
template <int BITS>
OPENAFM_AVX2 inline void lookup_block256(const uint8_t* p, const Table256<BITS>& t, __m256 w[4]) {
  const __m256i three = _mm256_set1_epi32(3), fifteen = _mm256_set1_epi32(15);
  if constexpr (BITS == 4 || BITS == 6) {
    const __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m256i b =
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)));
    __m256i i[4] = {_mm256_and_si256(a, fifteen), _mm256_and_si256(b, fifteen),
                    _mm256_srli_epi32(a, 4), _mm256_srli_epi32(b, 4)};
    if constexpr (BITS == 6) {
      const __m256i h =
          _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 16)));
      for (int q = 0; q < 4; ++q)
        i[q] = _mm256_or_si256(
            i[q], _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(h, 2 * q), three), 4));
    }
    for (int q = 0; q < 4; ++q) w[q] = lookup256<BITS>(i[q], t);
  } else {
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    __m256i i[4] = {v, _mm256_srli_epi32(v, 2), _mm256_srli_epi32(v, 4), _mm256_srli_epi32(v, 6)};
    if constexpr (BITS == 3) {
      uint32_t hi;
      std::memcpy(&hi, p + 8, 4);
      const __m256i bits = _mm256_set1_epi32(static_cast<int>(hi));
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      const __m256i one = _mm256_set1_epi32(1);
      for (int q = 0; q < 4; ++q) {
        const __m256i h = _mm256_and_si256(
            _mm256_srlv_epi32(bits, _mm256_add_epi32(lane, _mm256_set1_epi32(8 * q))), one);
        i[q] = _mm256_or_si256(_mm256_and_si256(i[q], three), _mm256_slli_epi32(h, 2));
      }
    }
    for (int q = 0; q < 4; ++q) w[q] = lookup256<BITS>(i[q], t);
  }
}

template <int BITS, int MC>
OPENAFM_AVX2 void lut_tile256(const Lut& w, const float* x, int64_t ldx, float* y, int64_t ldy,
                              int64_t tile) {
  constexpr int64_t bb = 4 * BITS;
  Table256<BITS> tab[kRows];
  for (int64_t r = 0; r < kRows; ++r)
    tab[r] = load_table256<BITS>(w.table(std::min(tile * kRows + r, w.rows - 1)));
  __m256 acc[kRows][MC];
  for (auto& row : acc)
    for (auto& a : row) a = _mm256_setzero_ps();
  for (int64_t blk = 0; blk < w.blocks; ++blk) {
    const uint8_t* p = w.block(tile, blk);
    _mm_prefetch(reinterpret_cast<const char*>(p + 8 * kRows * bb), _MM_HINT_T0);
    for (int64_t r = 0; r < kRows; ++r) {
      __m256 wv[4];
      lookup_block256<BITS>(p + r * bb, tab[r], wv);
      for (int m = 0; m < MC; ++m) {
        const float* xv = x + m * ldx + blk * kBlock;
        for (int q = 0; q < 4; ++q)
          acc[r][m] = _mm256_fmadd_ps(wv[q], _mm256_loadu_ps(xv + 8 * q), acc[r][m]);
      }
    }
  }
  for (int64_t r = 0; r < kRows; ++r) {
    const int64_t row = tile * kRows + r;
    if (row >= w.rows) break;
    const float s = w.row_scale(row);
    for (int m = 0; m < MC; ++m) y[m * ldy + row] = hsum256(acc[r][m]) * s;
  }
}

template <int BITS>
OPENAFM_AVX2 void dequantize_tile256(const Lut& w, int64_t tile, int64_t cols, float* dst) {
  constexpr int64_t bb = 4 * BITS;
  for (int64_t r = 0; r < kRows; ++r) {
    const int64_t row = tile * kRows + r;
    if (row >= w.rows) break;
    const Table256<BITS> tab = load_table256<BITS>(w.table(row));
    const __m256 s = _mm256_set1_ps(w.row_scale(row));
    float* d = dst + row * cols;
    for (int64_t blk = 0; blk < w.blocks; ++blk) {
      __m256 wv[4];
      lookup_block256<BITS>(w.block(tile, blk) + r * bb, tab, wv);
      const int64_t c = blk * kBlock, n = std::min<int64_t>(kBlock, cols - c);
      alignas(32) float tmp[kBlock];
      float* out = n == kBlock ? d + c : tmp;
      for (int q = 0; q < 4; ++q) _mm256_storeu_ps(out + 8 * q, _mm256_mul_ps(wv[q], s));
      if (n != kBlock) std::copy_n(tmp, n, d + c);
    }
  }
}

template <int BITS>
OPENAFM_AVX2 void lut_tiles256(const Lut& w, const Acts& x, float* y, int64_t ldy, int64_t t0,
                               int64_t t1) {
  for (int64_t tile = t0; tile < t1; ++tile) {
    int64_t m0 = 0;
    for (; m0 + 2 <= x.m; m0 += 2)
      lut_tile256<BITS, 2>(w, x.data + m0 * x.ld, x.ld, y + m0 * ldy, ldy, tile);
    if (m0 < x.m) lut_tile256<BITS, 1>(w, x.data + m0 * x.ld, x.ld, y + m0 * ldy, ldy, tile);
  }
}

template <int MC>
OPENAFM_AVX2 void int8_rows256_chunk(const int8_t* v, const float* scale, int64_t k,
                                     const float* x, int64_t ldx, float* y, int64_t ldy,
                                     int64_t row) {
  __m256 acc[kRows][MC];
  for (auto& r : acc)
    for (auto& a : r) a = _mm256_setzero_ps();
  const int64_t k8 = k / 8 * 8;
  for (int64_t r = 0; r < kRows; ++r) {  // row by row: the tile's bytes front to back
    for (int64_t j = 0; j < k8; j += 8) {
      const int8_t* src = v + (row + r) * k + j;
      if (j % 64 == 0)
        _mm_prefetch(reinterpret_cast<const char*>(src + kPrefetchRows * k), _MM_HINT_T0);
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src));
      const __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
      for (int m = 0; m < MC; ++m)
        acc[r][m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * ldx + j), acc[r][m]);
    }
  }
  for (int64_t r = 0; r < kRows; ++r) {
    for (int m = 0; m < MC; ++m) {
      float s = hsum256(acc[r][m]);
      for (int64_t j = k8; j < k; ++j) s += static_cast<float>(v[(row + r) * k + j]) * x[m * ldx + j];
      y[m * ldy + row + r] = s * scale[row + r];
    }
  }
}


template <int MC>
OPENAFM_AVX2 void int8_rows256_q_chunk(const int8_t* v, const float* scale, int64_t k,
                                       const int16_t* xq, int64_t ldq, const float* xs, float* y,
                                       int64_t ldy, int64_t row) {
  __m256i acc[kRows][MC];
  for (auto& r : acc)
    for (auto& a : r) a = _mm256_setzero_si256();
  const int64_t k16 = k / 16 * 16;
  for (int64_t r = 0; r < kRows; ++r) {  // row by row: the tile's bytes front to back
    for (int64_t j = 0; j < k16; j += 16) {
      const int8_t* src = v + (row + r) * k + j;
      if (j % 64 == 0)
        _mm_prefetch(reinterpret_cast<const char*>(src + kPrefetchRows * k), _MM_HINT_T0);
      const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
      for (int m = 0; m < MC; ++m) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * ldq + j));
        acc[r][m] = _mm256_add_epi32(acc[r][m], _mm256_madd_epi16(wv, xv));
      }
    }
  }
  for (int64_t r = 0; r < kRows; ++r) {
    for (int m = 0; m < MC; ++m) {
      alignas(32) int32_t lanes[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc[r][m]);
      int64_t s = 0;
      for (int32_t lane : lanes) s += lane;
      for (int64_t j = k16; j < k; ++j) s += int64_t{v[(row + r) * k + j]} * xq[m * ldq + j];
      y[m * ldy + row + r] = static_cast<float>(s) * xs[m] * scale[row + r];
    }
  }
}

OPENAFM_AVX2 void int8_rows256(const int8_t* v, const float* scale, int64_t k, const Acts& x,
                               float* y, int64_t ldy, int64_t r0, int64_t r1) {
  int64_t row = r0;
  for (; row + kRows <= r1; row += kRows) {
    int64_t m0 = 0;
    for (; m0 + 2 <= x.m; m0 += 2)
      int8_rows256_chunk<2>(v, scale, k, x.data + m0 * x.ld, x.ld, y + m0 * ldy, ldy, row);
    for (; m0 < x.m; ++m0)
      int8_rows256_chunk<1>(v, scale, k, x.data + m0 * x.ld, x.ld, y + m0 * ldy, ldy, row);
  }
  if (row < r1) int8_rows_portable(v, scale, k, x, y, ldy, row, r1);
}

#endif  // OPENAFM_X86

// ---- dispatch ------------------------------------------------------------------------------

using LutTiles = void (*)(const Lut&, const Acts&, float*, int64_t, int64_t, int64_t);

void dequantize_tile_portable(const Lut& w, int64_t tile, int64_t cols, float* dst) {
  const int64_t bb = block_bytes(w.bits);
  uint8_t idx[kBlock];
  for (int64_t r = 0; r < kRows; ++r) {
    const int64_t row = tile * kRows + r;
    if (row >= w.rows) break;
    const float* table = w.table(row);
    const float s = w.row_scale(row);
    float* d = dst + row * cols;
    for (int64_t blk = 0; blk < w.blocks; ++blk) {
      decode_block(w.block(tile, blk) + r * bb, w.bits, idx);
      const int64_t n = std::min<int64_t>(kBlock, cols - blk * kBlock);
      for (int64_t j = 0; j < n; ++j) d[blk * kBlock + j] = table[idx[j]] * s;
    }
  }
}

using DequantizeTile = void (*)(const Lut&, int64_t, int64_t, float*);

DequantizeTile dequantize_tile_for(int64_t isa, int64_t bits) {
#ifdef OPENAFM_X86
  if (isa == kAvx512) {
    switch (bits) {
      case 2: return dequantize_tile512<2>;
      case 3: return dequantize_tile512<3>;
      case 4: return dequantize_tile512<4>;
      case 6: return dequantize_tile512<6>;
    }
  }
  if (isa == kAvx2) {
    switch (bits) {
      case 2: return dequantize_tile256<2>;
      case 3: return dequantize_tile256<3>;
      case 4: return dequantize_tile256<4>;
      case 6: return dequantize_tile256<6>;
    }
  }
#endif
  return dequantize_tile_portable;
}

LutTiles lut_tiles_for(int64_t isa, int64_t bits) {
#ifdef OPENAFM_X86
  if (isa == kAvx512) {
    switch (bits) {
      case 2: return lut_tiles512<2>;
      case 3: return lut_tiles512<3>;
      case 4: return lut_tiles512<4>;
      case 6: return lut_tiles512<6>;
    }
  }
  if (isa == kAvx2) {
    switch (bits) {
      case 2: return lut_tiles256<2>;
      case 3: return lut_tiles256<3>;
      case 4: return lut_tiles256<4>;
      case 6: return lut_tiles256<6>;
    }
  }
#endif
  return lut_tiles_portable;
}

// Work is split over at most this many weights per task, so small products stay on one thread.
constexpr int64_t kGrainWeights = 1 << 16;

// x (m, k) float32 → a contiguous float32 copy padded with zeros to `k_padded` columns, or x.
at::Tensor padded_activations(const at::Tensor& x, int64_t k_padded) {
  at::Tensor flat = x.reshape({-1, x.size(-1)}).contiguous();
  if (flat.size(1) == k_padded) return flat;
  at::Tensor out = at::zeros({flat.size(0), k_padded}, flat.options());
  out.narrow(1, 0, flat.size(1)).copy_(flat);
  return out;
}

std::vector<int64_t> output_shape(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return shape;
}

Lut check_lut(const at::Tensor& planes, const at::Tensor& tables,
              const std::optional<at::Tensor>& scale, int64_t bits, int64_t group,
              int64_t out_features, int64_t in_features) {
  TORCH_CHECK(supported_bits(bits), "lookup-table kernel: unsupported bit width ", bits,
              " (supported: 2, 3, 4, 6)");
  TORCH_CHECK(group >= 1 && out_features >= 1 && in_features >= 1 && out_features % group == 0,
              "lookup-table kernel: group ", group, " does not divide ", out_features, " rows");
  const int64_t tiles = (out_features + kRows - 1) / kRows;
  const int64_t blocks = (in_features + kBlock - 1) / kBlock;
  TORCH_CHECK(planes.scalar_type() == at::kByte && planes.is_contiguous() && planes.is_cpu(),
              "lookup-table kernel: planes must be contiguous uint8 on the CPU");
  TORCH_CHECK(planes.numel() == tiles * blocks * kRows * block_bytes(bits),
              "lookup-table kernel: planes hold ", planes.numel(), " bytes, expected ",
              tiles * blocks * kRows * block_bytes(bits));
  TORCH_CHECK(tables.scalar_type() == at::kFloat && tables.is_contiguous() &&
                  tables.numel() == (out_features / group) << bits,
              "lookup-table kernel: tables must be contiguous float32 of ",
              (out_features / group) << bits, " entries");
  const float* scale_ptr = nullptr;
  if (scale.has_value()) {
    TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->is_contiguous() &&
                    scale->numel() == out_features,
                "lookup-table kernel: scale must be contiguous float32 of ", out_features);
    scale_ptr = scale->data_ptr<float>();
  }
  return Lut{planes.data_ptr<uint8_t>(), tables.data_ptr<float>(), scale_ptr, bits, group,
             out_features, tiles, blocks};
}

// Small float loops the compiler vectorizes for each instruction set (chosen at load time).
#if defined(OPENAFM_X86) && defined(__GNUC__) && !defined(__clang__)
#define OPENAFM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define OPENAFM_CLONES
#endif

OPENAFM_CLONES float dot_clones(const float* a, const float* b, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += a[j] * b[j];
  return s;
}

OPENAFM_CLONES void axpy_clones(float a, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] += a * x[j];
}

float dot(const float* a, const float* b, int64_t n) { return dot_clones(a, b, n); }

inline float bf16_to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

OPENAFM_CLONES float dot_bf16_clones(const uint16_t* a, const float* b, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += bf16_to_float(a[j]) * b[j];
  return s;
}

// An unmerged LoRA update `scale · (x Aᵀ) Bᵀ` (A (rank, k), B (n, rank)), float32 or bfloat16
// factors (bfloat16 halves the bytes a step reads; adapters are stored so).
struct LowRank {
  at::Tensor u;  // x Aᵀ, (m, rank) float32: `fill_low_rank` computes it
  const void* a = nullptr;
  const void* b = nullptr;
  int64_t rank = 0, n = 0, k = 0;
  bool columns = false;  // B stored column-major: its transpose (rank, n) is contiguous
  bool bf16 = false;
  float scale = 1.0f;
};

// Rows [j0, j1) of u = x Aᵀ for every row of x (m, lr.k).
void fill_low_rank(const LowRank& lr, const float* x, int64_t m, int64_t j0, int64_t j1) {
  float* u = lr.u.data_ptr<float>();
  for (int64_t j = j0; j < j1; ++j) {
    for (int64_t i = 0; i < m; ++i) {
      const float* xi = x + i * lr.k;
      u[i * lr.rank + j] =
          lr.bf16 ? dot_bf16_clones(static_cast<const uint16_t*>(lr.a) + j * lr.k, xi, lr.k)
                  : dot_clones(static_cast<const float*>(lr.a) + j * lr.k, xi, lr.k);
    }
  }
}

template <typename T>
inline float factor(const T* b, int64_t i) {
  if constexpr (std::is_same_v<T, uint16_t>) {
    return bf16_to_float(b[i]);
  } else {
    return b[i];
  }
}

template <typename T>
__attribute__((always_inline)) inline void add_low_rank_typed(const LowRank& lr, int64_t m,
                                                              float* y, int64_t ldy, int64_t r0,
                                                              int64_t r1) {
  const int64_t rank = lr.rank;
  const T* b = static_cast<const T*>(lr.b);
  for (int64_t i = 0; i < m; ++i) {
    const float* ui = lr.u.data_ptr<float>() + i * rank;
    float* yi = y + i * ldy;
    if (lr.columns) {
      for (int64_t j = 0; j < rank; ++j) {
        const float c = lr.scale * ui[j];
        const T* bj = b + j * lr.n;
#pragma omp simd
        for (int64_t row = r0; row < r1; ++row) yi[row] += c * factor(bj, row);
      }
      continue;
    }
    for (int64_t row = r0; row < r1; ++row) {
      const T* br = b + row * rank;
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < rank; ++j) s += factor(br, j) * ui[j];
      yi[row] += lr.scale * s;
    }
  }
}

// Adds the update to y's rows [r0, r1) (u filled). With B column-major the sums run a vector of
// output rows at a time; row-major B takes one short dot product per row.
OPENAFM_CLONES void add_low_rank(const LowRank& lr, int64_t m, float* y, int64_t ldy, int64_t r0,
                                 int64_t r1) {
  if (lr.bf16) return add_low_rank_typed<uint16_t>(lr, m, y, ldy, r0, r1);
  add_low_rank_typed<float>(lr, m, y, ldy, r0, r1);
}

LowRank low_rank(const at::Tensor& flat_x, const std::optional<at::Tensor>& a,
                 const std::optional<at::Tensor>& b, double lora_scale, int64_t n) {
  LowRank lr;
  if (!a.has_value() && !b.has_value()) return lr;
  TORCH_CHECK(a.has_value() && b.has_value(), "lut_linear: give both LoRA factors or neither");
  const bool columns = b->dim() == 2 && !b->is_contiguous() && b->t().is_contiguous();
  const at::ScalarType dtype = a->scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && b->scalar_type() == dtype &&
                  a->dim() == 2 && b->dim() == 2 && a->is_contiguous() &&
                  (b->is_contiguous() || columns),
              "lut_linear: LoRA factors must be 2-D, both float32 or both bfloat16, A "
              "contiguous, B contiguous or column-major");
  const int64_t rank = a->size(0), k = flat_x.size(1);
  TORCH_CHECK(a->size(1) == k && b->size(0) == n && b->size(1) == rank,
              "lut_linear: LoRA factors of shapes ", a->sizes(), " and ", b->sizes(),
              " do not fit a ", n, "x", k, " projection");
  lr.u = at::empty({flat_x.size(0), rank}, flat_x.options());
  lr.a = a->data_ptr();
  lr.b = b->data_ptr();
  lr.rank = rank;
  lr.n = n;
  lr.k = k;
  lr.columns = columns;
  lr.bf16 = dtype == at::kBFloat16;
  lr.scale = static_cast<float>(lora_scale);
  return lr;
}

// |Σ w·q| ≤ 127 · 16383 · k < 2^31: int32 sums of int8 × int16 products stay exact.
constexpr int64_t kMaxQuantCols = 1024;

// Activations (m, k) → int16 (m, k rounded up to 32, zero-padded) with one scale per row.
void quantize_rows(const float* x, int64_t m, int64_t k, int16_t* q, int64_t ldq, float* scales) {
  for (int64_t i = 0; i < m; ++i) {
    const float* xi = x + i * k;
    float amax = 0.0f;
    for (int64_t j = 0; j < k; ++j) amax = std::max(amax, std::abs(xi[j]));
    const float s = amax > 0.0f ? amax / 16383.0f : 1.0f;
    const float inv = 1.0f / s;
    int16_t* qi = q + i * ldq;
    for (int64_t j = 0; j < k; ++j) qi[j] = static_cast<int16_t>(std::nearbyint(xi[j] * inv));
    for (int64_t j = k; j < ldq; ++j) qi[j] = 0;
    scales[i] = s;
  }
}

// Rows x (m, k) rounded to int16 per row (as `quantize_rows`) and split into signed bytes
// q = 256·hi + lo (|hi| ≤ 64), `ldb` (a multiple of 64 ≥ k) per row, zero-padded; with Σlo and
// Σhi per row. `acts` then points into the tensors held here.
struct SplitActs {
  at::Tensor bytes, sums, scales;

  SplitActs(const float* x, int64_t m, int64_t k, Acts& acts, const at::TensorOptions& options) {
    const int64_t ldb = (k + 63) / 64 * 64;
    at::Tensor q = at::empty({m * ldb}, options.dtype(at::kShort));
    scales = at::empty({m}, options.dtype(at::kFloat));
    quantize_rows(x, m, k, q.data_ptr<int16_t>(), ldb, scales.data_ptr<float>());
    bytes = at::empty({2 * m * ldb}, options.dtype(at::kChar));
    sums = at::empty({2 * m}, options.dtype(at::kInt));
    const int16_t* qv = q.data_ptr<int16_t>();
    int8_t* lo = bytes.data_ptr<int8_t>();
    int8_t* hi = lo + m * ldb;
    int32_t* sum = sums.data_ptr<int32_t>();
    for (int64_t i = 0; i < m; ++i) {
      int32_t sum_lo = 0, sum_hi = 0;
      for (int64_t j = i * ldb; j < (i + 1) * ldb; ++j) {
        const int8_t low = static_cast<int8_t>(qv[j] & 0xFF);
        const int8_t high = static_cast<int8_t>((qv[j] - low) >> 8);
        lo[j] = low;
        hi[j] = high;
        sum_lo += low;
        sum_hi += high;
      }
      sum[2 * i] = sum_lo;
      sum[2 * i + 1] = sum_hi;
    }
    acts.lo = lo;
    acts.hi = hi;
    acts.ldb = ldb;
    acts.sums = sum;
    acts.xs = scales.data_ptr<float>();
  }
};

// Whether a product with int8 tables runs on them here (4 bits, AVX-512 with VNNI); elsewhere
// the float tables serve.
bool int8_tables_apply(int64_t isa, int64_t bits) { return bits == 4 && vnni_path(isa); }

void check_int8_tables(Lut& w, const at::Tensor& tables8,
                       const std::optional<at::Tensor>& table_scale) {
  const int64_t groups = w.rows / w.group;
  TORCH_CHECK(tables8.scalar_type() == at::kByte && tables8.is_contiguous() &&
                  tables8.numel() == groups * 16 && table_scale.has_value() &&
                  table_scale->scalar_type() == at::kFloat && table_scale->is_contiguous() &&
                  table_scale->numel() == groups,
              "lookup-table kernel: int8 tables must be contiguous uint8 of ", groups * 16,
              " entries with float32 scales of ", groups);
  w.tables8 = tables8.data_ptr<uint8_t>();
  w.table_scale = table_scale->data_ptr<float>();
}

// One product of `project`: a weight, its optional LoRA update, its output.
struct Product {
  Lut w;
  LutTiles run;
  LowRank lr;
  at::Tensor y;  // (m, out_features)
};

// Runs `part(i, lo, hi)` over ranges [lo, hi) of the parts of several products (sizes[i] each)
// as one parallel region over their concatenation, `grain` parts per task at least.
template <typename Part>
void parallel_over_parts(const std::vector<int64_t>& sizes, int64_t grain, const Part& part) {
  std::vector<int64_t> first{0};  // prefix sums of the sizes
  for (const int64_t size : sizes) first.push_back(first.back() + size);
  if (first.back() == 0) return;
  at::parallel_for(0, first.back(), grain, [&](int64_t g0, int64_t g1) {
    for (size_t i = 0; i < sizes.size(); ++i) {
      const int64_t lo = std::max(g0, first[i]) - first[i];
      const int64_t hi = std::min(g1, first[i + 1]) - first[i];
      if (lo < hi) part(i, lo, hi);
    }
  });
}

// Every product's x Aᵀ, split over threads by rows of A.
void fill_low_ranks(const std::vector<Product>& products, const at::Tensor& flat) {
  std::vector<int64_t> ranks;
  for (const Product& p : products) ranks.push_back(p.lr.rank);
  const int64_t m = flat.size(0), k = flat.size(1);
  const float* x = flat.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, kGrainWeights / 8 / (k * m));
  parallel_over_parts(ranks, grain, [&](size_t i, int64_t j0, int64_t j1) {
    fill_low_rank(products[i].lr, x, m, j0, j1);
  });
}

}  // namespace

namespace openafm {

int64_t resolve_isa(int64_t isa) { return resolve(isa); }

std::vector<at::Tensor> project(const at::Tensor& flat, const std::vector<const Projection*>& ws,
                                int64_t isa) {
  const int64_t in_features = flat.size(1), m = flat.size(0), n = ws.size();
  std::vector<Product> products;
  std::vector<int64_t> tiles;
  products.reserve(n);
  bool integer = false;  // some product runs on int8 tables and integer activations
  for (const Projection* p : ws) {
    Lut w = check_lut(p->planes, p->tables, p->scale, p->bits, p->group, p->out_features,
                      in_features);
    LutTiles run = lut_tiles_for(isa, p->bits);
    if (p->tables8.has_value() && int8_tables_apply(isa, p->bits)) {
      check_int8_tables(w, *p->tables8, p->table_scale);
#ifdef OPENAFM_X86
      run = lut4_q8_tiles512;
#endif
      integer = true;
    }
    products.push_back(Product{w, run,
                               low_rank(flat, p->lora_a, p->lora_b, p->lora_scale, p->out_features),
                               at::empty({m, p->out_features}, flat.options())});
    tiles.push_back(w.tiles);
  }
  fill_low_ranks(products, flat);
  const int64_t blocks = products[0].w.blocks;
  const at::Tensor xp = padded_activations(flat, blocks * kBlock);
  Acts acts{xp.data_ptr<float>(), m, xp.size(1)};
  std::optional<SplitActs> split;
  if (integer) split.emplace(flat.data_ptr<float>(), m, in_features, acts, flat.options());
  const int64_t grain = std::max<int64_t>(1, kGrainWeights / (kRows * blocks * kBlock * m));
  parallel_over_parts(tiles, grain, [&](size_t i, int64_t t0, int64_t t1) {
    const Product& p = products[i];
    const int64_t rows = p.w.rows;
    float* out = p.y.data_ptr<float>();
    p.run(p.w, acts, out, rows, t0, t1);
    if (p.lr.b != nullptr) {
      add_low_rank(p.lr, m, out, rows, t0 * kRows, std::min(t1 * kRows, rows));
    }
  });
  std::vector<at::Tensor> ys;
  for (Product& p : products) ys.push_back(std::move(p.y));
  return ys;
}

float dot(const float* a, const float* b, int64_t n) { return dot_clones(a, b, n); }

void axpy(float a, const float* x, float* y, int64_t n) { axpy_clones(a, x, y, n); }

void rms_norm_rows(const float* x, const float* weight, float eps, int64_t m, int64_t d,
                   float* y) {
  for (int64_t i = 0; i < m; ++i) {
    const float* xi = x + i * d;
    const float ss = dot(xi, xi, d);
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(d) + eps);
    for (int64_t j = 0; j < d; ++j) y[i * d + j] = xi[j] * inv * weight[j];
  }
}

void rope_row(const float* x, const float* c, const float* s, int64_t d, float* out) {
  const int64_t half = d / 2;
  for (int64_t e = 0; e < half; ++e) {
    const float lo = x[e], hi = x[e + half];
    out[e] = lo * c[e] + -hi * s[e];
    out[e + half] = hi * c[e + half] + lo * s[e + half];
  }
}

}  // namespace openafm

namespace {

// y_i = x W_iᵀ (+ lora_scale_i · (x A_iᵀ) B_iᵀ) for several palettized W_i of the same input
// (q/k/v, gate/up): one parallel region over all their row tiles; x (..., in_features) float32.
std::vector<at::Tensor> lut_linear_many(
    const at::Tensor& x, at::TensorList planes, at::TensorList tables,
    const c10::List<std::optional<at::Tensor>>& scales, at::IntArrayRef bits,
    at::IntArrayRef groups, at::IntArrayRef out_features, int64_t isa,
    const c10::List<std::optional<at::Tensor>>& lora_a,
    const c10::List<std::optional<at::Tensor>>& lora_b, at::ArrayRef<double> lora_scales,
    const c10::List<std::optional<at::Tensor>>& tables8,
    const c10::List<std::optional<at::Tensor>>& table_scales) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_cpu(), "lut_linear: x must be float32 on CPU");
  const size_t n = planes.size();
  TORCH_CHECK(n >= 1 && tables.size() == n && scales.size() == n && bits.size() == n &&
                  groups.size() == n && out_features.size() == n && lora_a.size() == n &&
                  lora_b.size() == n && lora_scales.size() == n &&
                  (tables8.empty() || (tables8.size() == n && table_scales.size() == n)),
              "lut_linear: give every argument list one entry per weight");
  std::vector<openafm::Projection> ws;
  ws.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    ws.push_back(openafm::Projection{planes[i], tables[i], scales.get(i), lora_a.get(i),
                                     lora_b.get(i), bits[i], groups[i], out_features[i],
                                     lora_scales[i]});
    if (!tables8.empty()) {
      ws.back().tables8 = tables8.get(i);
      ws.back().table_scale = table_scales.get(i);
    }
  }
  std::vector<const openafm::Projection*> refs;
  for (const auto& w : ws) refs.push_back(&w);
  const at::Tensor flat = x.reshape({-1, x.size(-1)}).contiguous();
  std::vector<at::Tensor> ys = openafm::project(flat, refs, resolve(isa));
  for (size_t i = 0; i < n; ++i) ys[i] = ys[i].view(output_shape(x, out_features[i]));
  return ys;
}

// y = x Wᵀ (+ lora_scale · (x Aᵀ) Bᵀ) for a palettized W; x (..., in_features) float32.
at::Tensor lut_linear(const at::Tensor& x, const at::Tensor& planes, const at::Tensor& tables,
                      const std::optional<at::Tensor>& scale, int64_t bits, int64_t group,
                      int64_t out_features, int64_t isa, const std::optional<at::Tensor>& lora_a,
                      const std::optional<at::Tensor>& lora_b, double lora_scale,
                      const std::optional<at::Tensor>& tables8,
                      const std::optional<at::Tensor>& table_scale) {
  c10::List<std::optional<at::Tensor>> scales, as, bs, t8, ts;
  scales.push_back(scale);
  as.push_back(lora_a);
  bs.push_back(lora_b);
  t8.push_back(tables8);
  ts.push_back(table_scale);
  return lut_linear_many(x, {planes}, {tables}, scales, {bits}, {group}, {out_features}, isa, as,
                         bs, {lora_scale}, t8, ts)[0];
}

// The dense float32 matrix (out_features, in_features) of a palettized weight (for prefill).
at::Tensor lut_dequantize(const at::Tensor& planes, const at::Tensor& tables,
                          const std::optional<at::Tensor>& scale, int64_t bits, int64_t group,
                          int64_t out_features, int64_t in_features, int64_t isa) {
  const Lut w = check_lut(planes, tables, scale, bits, group, out_features, in_features);
  at::Tensor out = at::empty({out_features, in_features}, tables.options());
  float* dst = out.data_ptr<float>();
  const DequantizeTile run = dequantize_tile_for(resolve(isa), bits);
  at::parallel_for(0, w.tiles, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t tile = t0; tile < t1; ++tile) run(w, tile, in_features, dst);
  });
  return out;
}

// y = x Vᵀ · scale for int8 rows V (out, in) with one float32 scale per row. With
// `quantize_activations`, x is first rounded to int16 per row (relative error ≤ 2^-15 of the
// row's largest value) and the products are summed exactly in integers: 2-3x faster (more with
// AVX-512 VNNI, same result).
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& scale,
                       int64_t isa, bool quantize_activations) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_cpu(), "int8_linear: x must be float32 on CPU");
  TORCH_CHECK(values.scalar_type() == at::kChar && values.dim() == 2 && values.is_contiguous(),
              "int8_linear: values must be contiguous int8 (rows, cols)");
  const int64_t n = values.size(0), k = values.size(1);
  TORCH_CHECK(x.size(-1) == k, "int8_linear: x has ", x.size(-1), " columns, the rows ", k);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == n,
              "int8_linear: scale must be contiguous float32 of ", n);
  const int64_t chosen = resolve(isa);
  const at::Tensor flat = x.reshape({-1, k}).contiguous();
  const int64_t m = flat.size(0);
  at::Tensor y = at::empty({m, n}, x.options());
  const Acts acts{flat.data_ptr<float>(), m, k};
  const int8_t* v = values.data_ptr<int8_t>();
  const float* s = scale.data_ptr<float>();
  float* out = y.data_ptr<float>();
  const bool quantized = quantize_activations && chosen != kPortable && k <= kMaxQuantCols;
  const bool vnni = quantized && vnni_path(chosen);
  const int64_t ldq = (k + kBlock - 1) / kBlock * kBlock;
  at::Tensor xq = at::empty({quantized && !vnni ? m * ldq : 0}, x.options().dtype(at::kShort));
  at::Tensor xs = at::empty({m}, x.options());
  if (quantized && !vnni)
    quantize_rows(acts.data, m, k, xq.data_ptr<int16_t>(), ldq, xs.data_ptr<float>());
  Acts split_acts = acts;
  std::optional<SplitActs> split;
  if (vnni) split.emplace(acts.data, m, k, split_acts, x.options());
  const int16_t* q = quantized && !vnni ? xq.data_ptr<int16_t>() : nullptr;
  const float* qs = vnni ? split_acts.xs : xs.data_ptr<float>();
  const int8_t* lo = split_acts.lo;
  const int8_t* hi = split_acts.hi;
  const int64_t ldb = split_acts.ldb;
  const int32_t* sum = split_acts.sums;
  const int64_t grain = std::max<int64_t>(kRows, kGrainWeights / (k * m)) / kRows * kRows;
  at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
#ifdef OPENAFM_X86
    if (quantized) {
      int64_t row = r0;
      for (; row + kRows <= r1; row += kRows) {
        int64_t i = 0;
        if (vnni) {
          for (; i + 2 <= m; i += 2)
            int8_rows512_vnni_chunk<2>(v, s, k, lo + i * ldb, hi + i * ldb, ldb, sum + 2 * i,
                                       qs + i, out + i * n, n, row);
          for (; i < m; ++i)
            int8_rows512_vnni_chunk<1>(v, s, k, lo + i * ldb, hi + i * ldb, ldb, sum + 2 * i,
                                       qs + i, out + i * n, n, row);
        } else if (chosen == kAvx512) {
          for (; i + 4 <= m; i += 4)
            int8_rows512_q_chunk<4>(v, s, k, q + i * ldq, ldq, qs + i, out + i * n, n, row);
          for (; i < m; ++i)
            int8_rows512_q_chunk<1>(v, s, k, q + i * ldq, ldq, qs + i, out + i * n, n, row);
        } else {
          for (; i + 2 <= m; i += 2)
            int8_rows256_q_chunk<2>(v, s, k, q + i * ldq, ldq, qs + i, out + i * n, n, row);
          for (; i < m; ++i)
            int8_rows256_q_chunk<1>(v, s, k, q + i * ldq, ldq, qs + i, out + i * n, n, row);
        }
      }
      if (row < r1) int8_rows_portable(v, s, k, acts, out, n, row, r1);
      return;
    }
    if (chosen == kAvx512) return int8_rows512(v, s, k, acts, out, n, r0, r1);
    if (chosen == kAvx2) return int8_rows256(v, s, k, acts, out, n, r0, r1);
#endif
    int8_rows_portable(v, s, k, acts, out, n, r0, r1);
  });
  return y.view(output_shape(x, n));
}

// RMSNorm of the last dimension, times `weight` (float32).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && x.is_cpu(),
              "rms_norm: float32 CPU tensors only");
  const int64_t d = x.size(-1);
  TORCH_CHECK(weight.numel() == d, "rms_norm: weight of ", weight.numel(), " for rows of ", d);
  const at::Tensor flat = x.reshape({-1, d}).contiguous();
  const at::Tensor w = weight.contiguous();
  at::Tensor y = at::empty_like(flat);
  openafm::rms_norm_rows(flat.data_ptr<float>(), w.data_ptr<float>(), static_cast<float>(eps),
                         flat.size(0), d, y.data_ptr<float>());
  return y.view(x.sizes());
}

// Rotary position embedding ("rotate half" layout): x (B, H, T, D) float32; cos and sin
// broadcast to (B, 1, T, D). The same two products and one sum per element as PyTorch's
// `x * cos + rotate_half(x) * sin`, so the result is the same to the bit.
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat &&
                  sin.scalar_type() == at::kFloat && x.is_cpu() && x.size(3) % 2 == 0,
              "rope: float32 CPU x of shape (B, H, T, D) with an even D");
  const int64_t b = x.size(0), h = x.size(1), t = x.size(2), d = x.size(3);
  const at::Tensor xc = x.contiguous();
  const at::Tensor c = cos.contiguous().expand({b, 1, t, d});
  const at::Tensor s = sin.contiguous().expand({b, 1, t, d});
  at::Tensor out = at::empty_like(xc);
  const float* xp = xc.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t cb = c.stride(0), ct = c.stride(2), sb = s.stride(0), st = s.stride(2);
  for (int64_t i = 0; i < b; ++i)
    for (int64_t j = 0; j < h; ++j)
      for (int64_t k = 0; k < t; ++k) {
        const int64_t row = ((i * h + j) * t + k) * d;
        openafm::rope_row(xp + row, cp + i * cb + k * ct, sp + i * sb + k * st, d, op + row);
      }
  return out;
}

}  // namespace

TORCH_LIBRARY(openafm, m) {
  m.def(
      "lut_linear(Tensor x, Tensor planes, Tensor tables, Tensor? scale, int bits, int group, "
      "int out_features, int isa=0, Tensor? lora_a=None, Tensor? lora_b=None, "
      "float lora_scale=1.0, Tensor? tables8=None, Tensor? table_scale=None) -> Tensor");
  m.def(
      "lut_linear_many(Tensor x, Tensor[] planes, Tensor[] tables, Tensor?[] scales, int[] bits, "
      "int[] groups, int[] out_features, int isa, Tensor?[] lora_a, Tensor?[] lora_b, "
      "float[] lora_scales, Tensor?[] tables8, Tensor?[] table_scales) -> Tensor[]");
  m.def(
      "lut_dequantize(Tensor planes, Tensor tables, Tensor? scale, int bits, int group, "
      "int out_features, int in_features, int isa=0) -> Tensor");
  m.def(
      "int8_linear(Tensor x, Tensor values, Tensor scale, int isa=0, "
      "bool quantize_activations=False) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("best_isa() -> int", &best_isa);
  m.def("int8_tables_apply(int isa) -> bool",
        [](int64_t isa) { return int8_tables_apply(resolve(isa), 4); });
}

TORCH_LIBRARY_IMPL(openafm, CPU, m) {
  m.impl("lut_linear", &lut_linear);
  m.impl("lut_linear_many", &lut_linear_many);
  m.impl("lut_dequantize", &lut_dequantize);
  m.impl("int8_linear", &int8_linear);
  m.impl("rms_norm", &rms_norm);
  m.impl("rope", &rope);
}
