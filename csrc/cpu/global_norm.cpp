// pytrain::global_norm for CPU tensors: sqrt of the sum of squares of all elements of a list of
// tensors, as a float32 0-dim tensor (the gradient-clipping norm of torch.nn.utils.clip_grad_norm_).
// Each chunk sums in double; the chunk sums are added in a fixed order, so the result does not
// depend on the number of threads and repeats bit for bit.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "cpu/multi_tensor.h"
#include "multi_tensor_checks.h"

namespace pytrain::cpu {
namespace {

double chunk_sum_squares(at::TensorList tensors, const Chunk& c) {
  const F32Tiles x(tensors[c.tensor]);
  const int64_t tile = tile_size(c.size, x.in_place());
  alignas(64) float buf[kTile];
  double sum = 0.0;
  for (int64_t off = 0; off < c.size; off += tile) {
    const int64_t n = std::min(tile, c.size - off);
    sum += sum_squares(x.load(c.begin + off, n, buf), n);
  }
  return sum;
}

at::Tensor global_norm(at::TensorList tensors) {
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(at::kFloat));
  if (tensors.empty()) {
    *out.data_ptr<float>() = 0.0f;
    return out;
  }
  check_float_tensors("global_norm", "tensors", tensors, c10::DeviceType::CPU);
  const ChunkPlan plan(tensors);
  std::vector<double> partials(plan.num_chunks());
  plan.run_all([&](int64_t i, const Chunk& c) { partials[i] = chunk_sum_squares(tensors, c); });
  double total = 0.0;
  for (const double p : partials) total += p;
  *out.data_ptr<float>() = static_cast<float>(std::sqrt(total));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pytrain, CPU, m) { m.impl("global_norm", &global_norm); }

}  // namespace pytrain::cpu
