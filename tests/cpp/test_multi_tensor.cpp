// C++ unit tests of the CPU multi-tensor machinery (csrc/cpu/multi_tensor.h), run by ctest:
//  * fp16 -> fp32 for all 65536 half bit patterns, and fp32 -> bf16 / fp16 rounding, bit-exact
//    against c10::Half and c10::BFloat16 (round to nearest even) over every exponent;
//  * ChunkPlan visits every element of every tensor exactly once, whatever the thread count, and
//    its cache batches partition the tensors.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cpu/multi_tensor.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what, uint64_t detail) {
  if (!ok && failures++ < 10) std::fprintf(stderr, "FAIL: %s (case %llu)\n", what, (unsigned long long)detail);
}

bool same_float(float a, float b) {
  return (a != a && b != b) || pytrain::cpu::f32_to_bits(a) == pytrain::cpu::f32_to_bits(b);
}

void test_half_to_float_all_patterns() {
  std::vector<uint16_t> halves(65536);
  std::vector<float> floats(65536);
  for (uint32_t i = 0; i < 65536; ++i) halves[i] = static_cast<uint16_t>(i);
  pytrain::cpu::f16_to_f32(halves.data(), floats.data(), 65536);
  for (uint32_t i = 0; i < 65536; ++i) {
    expect(same_float(floats[i], static_cast<float>(c10::Half(halves[i], c10::Half::from_bits()))), "f16_to_f32", i);
  }
}

// Floats of every exponent, with random mantissas plus the exact ties and their neighbours.
std::vector<float> probe_floats() {
  std::mt19937 gen(7);
  std::vector<float> out;
  for (uint32_t exponent = 0; exponent < 256; ++exponent) {
    for (uint32_t sign = 0; sign < 2; ++sign) {
      const uint32_t base = (sign << 31) | (exponent << 23);
      for (uint32_t tail : {0x0u, 0x1000u, 0x0fffu, 0x1001u, 0x8000u, 0x7fffu, 0x8001u, 0x18000u, 0x7fffffu}) {
        out.push_back(pytrain::cpu::bits_to_f32(base | tail));
      }
      for (int r = 0; r < 64; ++r) out.push_back(pytrain::cpu::bits_to_f32(base | (gen() & 0x7fffffu)));
    }
  }
  return out;
}

void test_float_to_half_and_bfloat16() {
  const std::vector<float> xs = probe_floats();
  std::vector<uint16_t> halves(xs.size()), bf16s(xs.size());
  pytrain::cpu::f32_to_f16(xs.data(), halves.data(), static_cast<int64_t>(xs.size()));
  pytrain::cpu::f32_to_bf16(xs.data(), bf16s.data(), static_cast<int64_t>(xs.size()));
  for (size_t i = 0; i < xs.size(); ++i) {
    const c10::Half h(xs[i]);
    const c10::BFloat16 b(xs[i]);
    const bool nan = xs[i] != xs[i];
    expect(nan ? (halves[i] & 0x7fffu) > 0x7c00u : halves[i] == h.x, "f32_to_f16", i);
    expect(nan ? (bf16s[i] & 0x7fffu) > 0x7f80u : bf16s[i] == b.x, "f32_to_bf16", i);
  }
}

void test_chunk_plan_covers_each_element_once() {
  const std::vector<int64_t> sizes = {1, 0, 65536, 65537, 300000, 255, 131072 * 3 + 17};
  std::vector<at::Tensor> tensors;
  for (int64_t n : sizes) tensors.push_back(at::zeros({n}, at::kInt));
  const pytrain::cpu::ChunkPlan plan(tensors);
  for (int threads : {1, 2, 3}) {
    at::set_num_threads(threads);
    for (auto& t : tensors) t.zero_();
    plan.run_all([&](int64_t, const pytrain::cpu::Chunk& c) {
      expect(c.begin % pytrain::kInt8Block == 0, "chunk aligned to int8 blocks", c.begin);
      int32_t* data = tensors[c.tensor].data_ptr<int32_t>();
      for (int64_t i = c.begin; i < c.begin + c.size; ++i) data[i] += 1;
    });
    for (size_t t = 0; t < tensors.size(); ++t) {
      expect(tensors[t].numel() == 0 || (tensors[t].min().item<int32_t>() == 1 && tensors[t].max().item<int32_t>() == 1),
             "every element visited once", t * 10 + threads);
    }
  }
  int64_t next_tensor = 0;
  for (const auto& batch : plan.batches(/*bytes_per_element=*/16, /*budget_bytes=*/1 << 20)) {
    expect(batch.first_tensor == next_tensor && batch.last_tensor > batch.first_tensor, "batches partition", next_tensor);
    next_tensor = batch.last_tensor;
  }
  expect(next_tensor == static_cast<int64_t>(sizes.size()), "batches cover all tensors", next_tensor);
}

}  // namespace

int main() {
  test_half_to_float_all_patterns();
  test_float_to_half_and_bfloat16();
  test_chunk_plan_covers_each_element_once();
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "passed", failures);
  return failures ? EXIT_FAILURE : EXIT_SUCCESS;
}
