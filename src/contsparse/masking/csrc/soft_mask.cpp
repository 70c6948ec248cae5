// The soft mask W * scale * sigmoid(beta * s) and its gradients in one pass each way.
//
// Eager PyTorch spends a pass over weight-sized memory per operation (three in the forward,
// three in the backward); on a CPU such a pass costs about as much as a small matmul. These loops
// read every tensor once. Built by contsparse/masking/kernels.py; float32, contiguous, CPU only.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kGrain = 16384;  // elements per task: below this a second thread costs more than it saves

void check(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              name, " must be a contiguous float32 CPU tensor");
  TORCH_CHECK(t.numel() == like.numel(), name, " has ", t.numel(), " elements, expected ", like.numel());
}

// Applies body(offset, count) to [begin, end) in vector-wide pieces, the last one partial.
template <typename Body>
void for_vectors(int64_t begin, int64_t end, const Body& body) {
  int64_t i = begin;
  for (; i + Vec::size() <= end; i += Vec::size()) body(i, Vec::size());
  if (i < end) body(i, end - i);
}

Vec sigmoid(const Vec& logits, const Vec& beta) {  // as torch.sigmoid computes it, so both paths agree
  return (Vec(1.0f) + (logits * beta).neg().exp()).reciprocal();
}

// Returns W * scale * m with m = sigmoid(beta * s), and m itself when keep_mask (else an empty tensor:
// the backward pass recomputes it, which on a CPU is cheaper than a weight-sized tensor's trip to memory).
std::vector<at::Tensor> forward(const at::Tensor& weight, const at::Tensor& logits, double beta, double scale,
                                bool keep_mask) {
  check(weight, weight, "weight");
  check(logits, weight, "logits");
  auto out = at::empty_like(weight);
  auto mask = keep_mask ? at::empty_like(weight) : at::empty({0}, weight.options());
  const float* w = weight.data_ptr<float>();
  const float* s = logits.data_ptr<float>();
  float* o = out.data_ptr<float>();
  float* m = keep_mask ? mask.data_ptr<float>() : nullptr;
  const Vec b(static_cast<float>(beta)), sc(static_cast<float>(scale));
  at::parallel_for(0, weight.numel(), kGrain, [&](int64_t begin, int64_t end) {
    for_vectors(begin, end, [&](int64_t i, int64_t n) {
      Vec mi = sigmoid(Vec::loadu(s + i, n), b);
      if (m != nullptr) mi.store(m + i, n);
      (Vec::loadu(w + i, n) * mi * sc).store(o + i, n);
    });
  });
  return {out, mask};
}

// Returns (dL/dW, dL/ds) for the gradient g of W * scale * m, plus penalty * sum(m) when penalty > 0:
// dW = g * scale * m,  ds = (g * W * scale + penalty) * beta * m * (1 - m). `saved` is m itself when
// is_mask, else the logits s (m is recomputed).
std::vector<at::Tensor> backward(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& saved,
                                 bool is_mask, double beta, double scale, double penalty) {
  check(weight, weight, "weight");
  check(grad, weight, "grad");
  check(saved, weight, is_mask ? "mask" : "logits");
  auto grad_weight = at::empty_like(weight);
  auto grad_logits = at::empty_like(weight);
  const float* g = grad.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  const float* from = saved.data_ptr<float>();
  float* gw = grad_weight.data_ptr<float>();
  float* gs = grad_logits.data_ptr<float>();
  const Vec b(static_cast<float>(beta)), sc(static_cast<float>(scale)), bs(static_cast<float>(beta * scale)),
      bp(static_cast<float>(beta * penalty)), one(1.0f);
  at::parallel_for(0, weight.numel(), kGrain, [&](int64_t begin, int64_t end) {
    for_vectors(begin, end, [&](int64_t i, int64_t n) {
      Vec mi = is_mask ? Vec::loadu(from + i, n) : sigmoid(Vec::loadu(from + i, n), b);
      Vec gi = Vec::loadu(g + i, n);
      (gi * mi * sc).store(gw + i, n);
      ((gi * Vec::loadu(w + i, n) * bs + bp) * (mi * (one - mi))).store(gs + i, n);
    });
  });
  return {grad_weight, grad_logits};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("forward", &forward, "(W * scale * sigmoid(beta * s), sigmoid(beta * s) if keep_mask else empty)");
  module.def("backward", &backward, "gradients of the soft-masked weight for W and s, penalty included");
}
