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

// Plain dense float32 CPU memory the loops can read: no batched, zero, subclass (Python) tensor.
bool plain_float_cpu(const at::Tensor& t) {
  return t.device().is_cpu() && t.scalar_type() == at::kFloat && t.layout() == at::kStrided &&
         !t.key_set().has_any(c10::DispatchKeySet({c10::DispatchKey::Batched, c10::DispatchKey::FuncTorchBatched,
                                                   c10::DispatchKey::Python, c10::DispatchKey::ZeroTensor}));
}

bool loop_ready(const at::Tensor& t, const at::Tensor& like) {
  return plain_float_cpu(t) && t.is_contiguous() && t.sizes() == like.sizes();
}

void check(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(loop_ready(t, like), name, " must be a contiguous float32 CPU tensor of shape ", like.sizes(),
              ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
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
std::vector<at::Tensor> masked_forward(const at::Tensor& weight, const at::Tensor& logits, double beta, double scale,
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
std::vector<at::Tensor> masked_backward(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& saved,
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

// The differentiable formula in ATen operations, for a backward pass that must itself be
// differentiated (create_graph=True) or whose gradient the loops cannot read (batched, subclass).
std::vector<at::Tensor> formula_backward(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& logits,
                                         double beta, double scale, double penalty) {
  auto mask = at::sigmoid(logits * beta);
  return {grad * mask * scale, (grad * weight * scale + penalty) * beta * mask * (1 - mask)};
}

// The penalty's flag, also when it is an inference tensor (a model deep-copied under inference_mode)
void set_flag(const at::Tensor& flag, bool value) {
  c10::InferenceMode guard;
  flag.fill_(value);
}

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

// The masked weight as an autograd node written in C++: with several masked layers per step, the
// Python autograd.Function's own calls (forward, backward, context) cost as much as the small
// layers' arithmetic. `penalty_due` is the mask's flag (a bool scalar tensor shared with the Python
// paths): the first backward pass after a forward pass adds the fused penalty's gradient and clears
// it, so a weight used several times in one step gets the penalty once. The forward sets it unless
// it is a recomputation inside a backward pass (activation checkpointing): `mark_due`.
struct SoftMaskedWeight : public torch::autograd::Function<SoftMaskedWeight> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& weight, const at::Tensor& logits, double beta,
                            double scale, double penalty, const at::Tensor& penalty_due, bool mark_due) {
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = masked_forward(weight, logits, beta, scale, false)[0];  // the mask is recomputed in the backward pass
    }
    if (mark_due) set_flag(penalty_due, true);
    ctx->save_for_backward({weight, logits});
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["penalty"] = penalty;
    ctx->saved_data["penalty_due"] = penalty_due;
    return out;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor& weight = saved[0];
    const at::Tensor& logits = saved[1];
    auto due = ctx->saved_data["penalty_due"].toTensor();
    double penalty = 0.0;
    if (due.item<bool>()) {
      penalty = ctx->saved_data["penalty"].toDouble();
      set_flag(due, false);
    }
    const double beta = ctx->saved_data["beta"].toDouble(), scale = ctx->saved_data["scale"].toDouble();
    const at::Tensor& grad = grads[0];
    std::vector<at::Tensor> result;
    // The loops need plain float32 CPU tensors; a saved-tensor hook may hand back another layout
    if (at::GradMode::is_enabled() || !plain_float_cpu(grad) || !loop_ready(weight, weight) ||
        !loop_ready(logits, weight) || grad.sizes() != weight.sizes()) {
      result = formula_backward(grad, weight, logits, beta, scale, penalty);
    } else {
      result = masked_backward(grad.contiguous(), weight, logits, false, beta, scale, penalty);
    }
    return {result[0], result[1], at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor soft_masked_weight(const at::Tensor& weight, const at::Tensor& logits, double beta, double scale,
                              double penalty, const at::Tensor& penalty_due, bool mark_due) {
  check(weight, weight, "weight");
  check(logits, weight, "logits");
  return SoftMaskedWeight::apply(weight, logits, beta, scale, penalty, penalty_due, mark_due);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("forward", &masked_forward, "(W * scale * sigmoid(beta * s), sigmoid(beta * s) if keep_mask else empty)");
  module.def("backward", &masked_backward, "gradients of the soft-masked weight for W and s, penalty included");
  module.def("soft_masked_weight", &soft_masked_weight,
             "W * scale * sigmoid(beta * s) as an autograd node, the penalty's gradient fused into its backward");
}
