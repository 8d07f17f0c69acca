// What the decoder stack (decoder_stack.cpp) uses from the product kernels (lut_kernels.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace openafm {

// One palettized weight in the kernels' layout (see lut_kernels.cpp), with an optional LoRA
// update `lora_scale · (x Aᵀ) Bᵀ` (A (rank, in), B (out, rank), both float32 or both bfloat16)
// and optional int8 tables (4 bits: uint8 entry + 128 per group of 16, a float32 scale per
// group).
struct Projection {
  at::Tensor planes, tables;
  std::optional<at::Tensor> scale, lora_a, lora_b;
  int64_t bits, group, out_features;
  double lora_scale;
  std::optional<at::Tensor> tables8 = std::nullopt, table_scale = std::nullopt;
};

// The instruction set to run (0 = the best this CPU has); checks that the CPU has it.
int64_t resolve_isa(int64_t isa);

// `flat` (m, in) contiguous float32 times every weight of `ws` (one parallel region, after one
// for the LoRA updates' x Aᵀ); each output is (m, out_features).
std::vector<at::Tensor> project(const at::Tensor& flat, const std::vector<const Projection*>& ws,
                                int64_t isa);

float dot(const float* a, const float* b, int64_t n);
void axpy(float a, const float* x, float* y, int64_t n);  // y += a·x

// `m` rows of `d`: y = x / sqrt(mean(x²) + eps) · weight.
void rms_norm_rows(const float* x, const float* weight, float eps, int64_t m, int64_t d,
                   float* y);

// Rotary embedding of one head vector ("rotate half" layout); `out` may be `x`.
void rope_row(const float* x, const float* c, const float* s, int64_t d, float* out);

}  // namespace openafm
