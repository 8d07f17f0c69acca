// The decoder layers of a palettized model as one native call per forward (decode and
// speculative verification: a few new tokens of one sequence, with a float32 KV cache).
//
// Registered as the TorchScript class `torch.classes.openafm.DecoderStack`. Built once from the
// model's tensors (see `openafm/kernels/decoder.py`, which also holds its PyTorch reference),
// it runs every layer — RMSNorm, the fused q/k/v and gate/up products (with LoRA updates),
// rotary embedding, the KV-cache write, grouped-query attention, SwiGLU and the residual adds —
// without returning to Python in between, whose per-operation overhead was half of a decode
// step.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels.h"

namespace {

using openafm::Projection;

constexpr int64_t kProjections = 7;  // q, k, v, o, gate, up, down
constexpr int64_t kIntsPerProjection = 6;  // bits, group, out_features, has_scale, has_lora,
                                           // has_int8_tables
constexpr int64_t kHeaderInts = 6;  // layers, heads, kv_heads, head_dim, qk_norm, isa
constexpr int64_t kGrainFlops = 1 << 15;  // attention work per task

struct Layer {
  at::Tensor attn_norm, mlp_norm, q_norm, k_norm;  // q_norm, k_norm: optional
  Projection q, k, v, o, gate, up, down;
};

// Stages timed when profiling (nanoseconds, summed over calls).
enum Stage : int64_t { kNorms, kProducts, kRopeCache, kAttention, kActivation, kStages };

class Timer {
 public:
  Timer(bool on, int64_t* ns) : on_(on), ns_(ns) {
    if (on_) last_ = std::chrono::steady_clock::now();
  }
  void lap(Stage stage) {
    if (!on_) return;
    const auto now = std::chrono::steady_clock::now();
    ns_[stage] += std::chrono::duration_cast<std::chrono::nanoseconds>(now - last_).count();
    last_ = now;
  }

 private:
  bool on_;
  int64_t* ns_;
  std::chrono::steady_clock::time_point last_;
};

void check_vector(const at::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_cpu() && t.is_contiguous() && t.numel() == n,
              "DecoderStack: ", what, " must be contiguous float32 of ", n);
}

// softmax(q Kᵀ / √d) V for each head and new token; token t sees cached positions ≤ pos + t.
void attend(const float* q, const float* keys, const float* values, float* out, int64_t tokens,
            int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t max_len, int64_t pos) {
  const int64_t per_group = heads / kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  const int64_t flops = 4 * (pos + tokens) * head_dim;
  const int64_t grain = std::max<int64_t>(1, kGrainFlops / flops);
  at::parallel_for(0, heads * tokens, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> p(pos + tokens);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / heads, h = i % heads, g = h / per_group, n = pos + t + 1;
      const float* qv = q + (t * heads + h) * head_dim;
      const float* k = keys + g * max_len * head_dim;
      const float* v = values + g * max_len * head_dim;
      float* o = out + (t * heads + h) * head_dim;
      float top = -INFINITY;
      for (int64_t j = 0; j < n; ++j) {
        p[j] = openafm::dot(qv, k + j * head_dim, head_dim) * scale;
        top = std::max(top, p[j]);
      }
      float sum = 0.0f;
      for (int64_t j = 0; j < n; ++j) sum += (p[j] = std::exp(p[j] - top));
      std::fill(o, o + head_dim, 0.0f);
      for (int64_t j = 0; j < n; ++j) openafm::axpy(p[j], v + j * head_dim, o, head_dim);
      const float inv = 1.0f / sum;
      for (int64_t e = 0; e < head_dim; ++e) o[e] *= inv;
    }
  });
}

class DecoderStack : public torch::CustomClassHolder {
 public:
  // tensors: per layer the two norm weights (and the per-head q and k norms' with qk_norm),
  // then per projection (q, k, v, o, gate, up, down) its planes and tables, its row scale if it
  // has one, its LoRA factors A and B if it has them, its int8 tables and their scales if it
  // has them.
  // ints: layers, heads, kv_heads, head_dim, qk_norm, isa, then per projection bits, group,
  // out_features, has_scale, has_lora, has_int8_tables. floats: the norms' eps, then per projection its LoRA
  // scale.
  DecoderStack(std::vector<at::Tensor> tensors, std::vector<int64_t> ints,
               std::vector<double> floats)
      : ns_(kStages, 0) {
    TORCH_CHECK(ints.size() >= kHeaderInts, "DecoderStack: too few integers");
    const int64_t n_layers = ints[0];
    heads_ = ints[1];
    kv_heads_ = ints[2];
    head_dim_ = ints[3];
    qk_norm_ = ints[4] != 0;
    isa_ = openafm::resolve_isa(ints[5]);
    TORCH_CHECK(n_layers >= 1 && kv_heads_ >= 1 && heads_ % kv_heads_ == 0 && head_dim_ % 2 == 0,
                "DecoderStack: ", heads_, " heads, ", kv_heads_, " key/value heads and head size ",
                head_dim_, " do not fit");
    TORCH_CHECK(ints.size() == static_cast<size_t>(kHeaderInts +
                                                   n_layers * kProjections * kIntsPerProjection) &&
                    floats.size() == static_cast<size_t>(1 + n_layers * kProjections),
                "DecoderStack: integers or floats do not match ", n_layers, " layers");
    eps_ = static_cast<float>(floats[0]);
    size_t next_tensor = 0, next_int = kHeaderInts, next_float = 1;
    auto take = [&]() {
      TORCH_CHECK(next_tensor < tensors.size(), "DecoderStack: too few tensors");
      return tensors[next_tensor++];
    };
    for (int64_t l = 0; l < n_layers; ++l) {
      Layer layer;
      layer.attn_norm = take();
      layer.mlp_norm = take();
      if (qk_norm_) {
        layer.q_norm = take();
        layer.k_norm = take();
      }
      for (Projection* p : {&layer.q, &layer.k, &layer.v, &layer.o, &layer.gate, &layer.up,
                            &layer.down}) {
        p->bits = ints[next_int];
        p->group = ints[next_int + 1];
        p->out_features = ints[next_int + 2];
        const bool has_scale = ints[next_int + 3] != 0, has_lora = ints[next_int + 4] != 0;
        const bool has_tables8 = ints[next_int + 5] != 0;
        next_int += kIntsPerProjection;
        p->planes = take();
        p->tables = take();
        if (has_scale) p->scale = take();
        if (has_lora) {
          p->lora_a = take();
          p->lora_b = take();
        }
        if (has_tables8) {
          p->tables8 = take();
          p->table_scale = take();
        }
        p->lora_scale = floats[next_float++];
      }
      layers_.push_back(std::move(layer));
    }
    TORCH_CHECK(next_tensor == tensors.size(), "DecoderStack: ", tensors.size() - next_tensor,
                " tensors too many");
    dim_ = layers_[0].attn_norm.numel();
    for (const Layer& layer : layers_) {
      check_vector(layer.attn_norm, dim_, "every norm weight");
      check_vector(layer.mlp_norm, dim_, "every norm weight");
      if (qk_norm_) {
        check_vector(layer.q_norm, head_dim_, "every q/k norm weight");
        check_vector(layer.k_norm, head_dim_, "every q/k norm weight");
      }
      TORCH_CHECK(layer.q.out_features == heads_ * head_dim_ &&
                      layer.k.out_features == kv_heads_ * head_dim_ &&
                      layer.v.out_features == kv_heads_ * head_dim_ &&
                      layer.o.out_features == dim_ && layer.down.out_features == dim_ &&
                      layer.gate.out_features == layer.up.out_features,
                  "DecoderStack: projection sizes do not fit the heads and the model width");
    }
  }

  // `h` (T, dim): the new tokens' embeddings; `keys`, `values` (layers, 1, kv_heads, max_len,
  // head_dim): the cache, written at positions pos..pos+T-1; `cos`, `sin` (T, head_dim): the
  // rotary tables at those positions. Returns the hidden states after the last layer.
  at::Tensor forward(at::Tensor h, at::Tensor keys, at::Tensor values, int64_t pos,
                     at::Tensor cos, at::Tensor sin) {
    TORCH_CHECK(h.dim() == 2 && h.size(1) == dim_, "DecoderStack: h must be (tokens, ", dim_, ")");
    const int64_t tokens = h.size(0), hd = head_dim_;
    TORCH_CHECK(keys.dim() == 5 && keys.sizes() == values.sizes() &&
                    keys.size(0) == static_cast<int64_t>(layers_.size()) && keys.size(1) == 1 &&
                    keys.size(2) == kv_heads_ && keys.size(4) == hd,
                "DecoderStack: the cache must be (layers, 1, kv_heads, max_len, head_dim)");
    TORCH_CHECK(keys.scalar_type() == at::kFloat && values.scalar_type() == at::kFloat &&
                    keys.is_contiguous() && values.is_contiguous(),
                "DecoderStack: the cache must be contiguous float32");
    const int64_t max_len = keys.size(3);
    TORCH_CHECK(pos >= 0 && pos + tokens <= max_len, "DecoderStack: positions ", pos, "..",
                pos + tokens, " exceed the cache's ", max_len);
    check_vector(cos, tokens * hd, "cos");
    check_vector(sin, tokens * hd, "sin");
    Timer timer(profiling_, ns_.data());
    at::Tensor x = h.to(at::kFloat).contiguous().clone();
    at::Tensor normed = at::empty_like(x);
    at::Tensor attn = at::empty({tokens, heads_ * hd}, x.options());
    float* xs = x.data_ptr<float>();
    const float* cs = cos.data_ptr<float>();
    const float* sn = sin.data_ptr<float>();
    const int64_t layer_stride = kv_heads_ * max_len * hd;
    for (size_t l = 0; l < layers_.size(); ++l) {
      const Layer& layer = layers_[l];
      openafm::rms_norm_rows(xs, layer.attn_norm.data_ptr<float>(), eps_, tokens, dim_,
                             normed.data_ptr<float>());
      timer.lap(kNorms);
      std::vector<at::Tensor> qkv =
          openafm::project(normed, {&layer.q, &layer.k, &layer.v}, isa_);
      timer.lap(kProducts);
      float* q = qkv[0].data_ptr<float>();
      float* k = qkv[1].data_ptr<float>();
      const float* v = qkv[2].data_ptr<float>();
      if (qk_norm_) {
        openafm::rms_norm_rows(q, layer.q_norm.data_ptr<float>(), eps_, tokens * heads_, hd, q);
        openafm::rms_norm_rows(k, layer.k_norm.data_ptr<float>(), eps_, tokens * kv_heads_, hd, k);
      }
      float* key_cache = keys.data_ptr<float>() + l * layer_stride;
      float* value_cache = values.data_ptr<float>() + l * layer_stride;
      for (int64_t t = 0; t < tokens; ++t) {
        for (int64_t hh = 0; hh < heads_; ++hh) {
          float* row = q + (t * heads_ + hh) * hd;
          openafm::rope_row(row, cs + t * hd, sn + t * hd, hd, row);
        }
        for (int64_t g = 0; g < kv_heads_; ++g) {
          const int64_t slot = (g * max_len + pos + t) * hd;
          openafm::rope_row(k + (t * kv_heads_ + g) * hd, cs + t * hd, sn + t * hd, hd,
                            key_cache + slot);
          std::copy_n(v + (t * kv_heads_ + g) * hd, hd, value_cache + slot);
        }
      }
      timer.lap(kRopeCache);
      attend(q, key_cache, value_cache, attn.data_ptr<float>(), tokens, heads_, kv_heads_, hd,
             max_len, pos);
      timer.lap(kAttention);
      add_into(xs, openafm::project(attn, {&layer.o}, isa_)[0]);
      timer.lap(kProducts);
      openafm::rms_norm_rows(xs, layer.mlp_norm.data_ptr<float>(), eps_, tokens, dim_,
                             normed.data_ptr<float>());
      timer.lap(kNorms);
      std::vector<at::Tensor> gate_up = openafm::project(normed, {&layer.gate, &layer.up}, isa_);
      timer.lap(kProducts);
      float* gate = gate_up[0].data_ptr<float>();
      const float* up = gate_up[1].data_ptr<float>();
      for (int64_t i = 0; i < gate_up[0].numel(); ++i) {
        gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
      }
      timer.lap(kActivation);
      add_into(xs, openafm::project(gate_up[0], {&layer.down}, isa_)[0]);
      timer.lap(kProducts);
    }
    return x;
  }

  // Nanoseconds spent per stage since profiling was turned on: norms, products (with their LoRA
  // updates and the residual adds), rotary embedding and cache write, attention, activation.
  std::vector<int64_t> timings() const { return ns_; }

  void profile(bool on) {
    profiling_ = on;
    std::fill(ns_.begin(), ns_.end(), 0);
  }

 private:
  static void add_into(float* x, const at::Tensor& y) {
    const float* ys = y.data_ptr<float>();
    for (int64_t i = 0; i < y.numel(); ++i) x[i] += ys[i];
  }

  std::vector<Layer> layers_;
  int64_t dim_ = 0, heads_ = 0, kv_heads_ = 0, head_dim_ = 0, isa_ = 0;
  float eps_ = 0.0f;
  bool qk_norm_ = false, profiling_ = false;
  std::vector<int64_t> ns_;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(openafm, m) {
  m.class_<DecoderStack>("DecoderStack")
      .def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>, std::vector<double>>())
      .def("forward", &DecoderStack::forward)
      .def("timings", &DecoderStack::timings)
      .def("profile", &DecoderStack::profile);
}
