// Host-side unit tests of the code the CUDA kernels share with the host: similarity_math.h and
// launch_plan.h, compiled with the plain host compiler (tests/test_cuda_host.py builds and runs
// this). The kernels themselves run on the CPU emulation in kernels_emulated_test.cpp. Prints one
// line per failure and exits non-zero if there was any.
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "launch_plan.h"
#include "similarity_math.h"

using namespace fused_losses;

namespace {

int failures = 0;
int checks = 0;

void check(bool ok, const char* what, int line, double got = 0, double want = 0) {
  ++checks;
  if (!ok) {
    ++failures;
    std::printf("FAIL line %d: %s (got %.9g, want %.9g)\n", line, what, got, want);
  }
}
#define CHECK(cond) check((cond), #cond, __LINE__)
#define CHECK_CLOSE(got, want, rel)                                                                    \
  do {                                                                                                 \
    const double g_ = (got), w_ = (want);                                                              \
    const bool ok_ = (std::isinf(w_) && g_ == w_) || std::fabs(g_ - w_) <= (rel) * (1.0 + std::fabs(w_)); \
    check(ok_, #got " ~ " #want, __LINE__, g_, w_);                                                    \
  } while (0)

constexpr double kInf = std::numeric_limits<double>::infinity();

// log-sum-exp (natural units) of values given in log2 units, as lse_finish reports it.
double direct_lse(const std::vector<float>& values2) {
  double max = -kInf;
  for (float v : values2) max = std::fmax(max, v);
  if (max == -kInf) return -kInf;
  long double sum = 0;
  for (float v : values2) sum += std::exp2(static_cast<long double>(v) - max);
  return (max + std::log2(static_cast<double>(sum))) * std::log(2.0);
}

std::vector<float> random_values(std::mt19937& rng, int count, float spread, double masked_fraction) {
  std::uniform_real_distribution<float> value(-spread, spread);
  std::bernoulli_distribution masked(masked_fraction);
  std::vector<float> values(count);
  for (float& v : values) v = masked(rng) ? kNegInf : value(rng);
  return values;
}

void test_lse_merge() {
  const LseState a{2.f, 3.f};
  const LseState empty = lse_empty();
  const LseState left = lse_merge(empty, a), right = lse_merge(a, empty);
  CHECK(left.max == a.max && left.sum == a.sum);  // bit for bit: the kernels start from empty
  CHECK(right.max == a.max && right.sum == a.sum);
  const LseState both_empty = lse_merge(empty, empty);
  CHECK(both_empty.max == kNegInf && both_empty.sum == 0.f);  // no NaN from -inf - -inf
  CHECK(lse_finish(both_empty) == kNegInf);
  const LseState ab = lse_merge(a, LseState{5.f, 1.f}), ba = lse_merge(LseState{5.f, 1.f}, a);
  CHECK(ab.max == ba.max && ab.sum == ba.sum);  // symmetric: both shuffle lanes agree
  CHECK_CLOSE(lse_finish(ab), std::log(3.0 * std::exp2(2.0) + std::exp2(5.0)), 1e-6);

  // Any split of a set, merged in any grouping, gives the set's log-sum-exp.
  std::mt19937 rng(1);
  for (int trial = 0; trial < 200; ++trial) {
    const int count = 1 + trial % 97;
    const std::vector<float> values = random_values(rng, count, trial % 2 ? 80.f : 3.f, trial % 3 == 0 ? 0.5 : 0.0);
    LseState running = lse_empty();
    for (int start = 0; start < count; start += 8) {
      LseState block = lse_empty();
      for (int t = start; t < count && t < start + 8; ++t) block = lse_merge(block, LseState{values[t], 1.f});
      running = lse_merge(running, block);
    }
    CHECK_CLOSE(lse_finish(running), direct_lse(values), 1e-6);
  }
}

void test_nan_max() {
  CHECK(nan_max(1.f, 2.f) == 2.f && nan_max(kNegInf, -3.f) == -3.f);
  CHECK(std::isnan(nan_max(NAN, 2.f)) && std::isnan(nan_max(kNegInf, NAN)));  // fmaxf would drop the NaN
  const LseState nan = lse_merge(LseState{NAN, 1.f}, LseState{kNegInf, 0.f});
  CHECK(std::isnan(lse_finish(nan)));  // a NaN entry is not silently dropped
}

void test_elementwise() {
  const float xs[] = {-1e30f, -200.f, -88.f, -20.f, -1.f, -1e-8f, 0.f, 1e-8f, 1.f, 20.f, 88.f, 200.f, 1e30f};
  for (float x : xs) {
    const long double e = std::exp(-std::fabs(static_cast<long double>(x)));
    const long double softplus_want = std::fmax(static_cast<long double>(x), 0.0L) + std::log1p(e);
    const long double sigmoid_want = x >= 0 ? 1 / (1 + e) : e / (1 + e);
    const float x2 = x * kLog2E;
    CHECK_CLOSE(softplus2(x2) * kLn2, static_cast<double>(softplus_want), 1e-6);
    CHECK_CLOSE(sigmoid2(x2), static_cast<double>(sigmoid_want), 1e-6);
  }
  // far left, softplus is exp(x): relative accuracy where log2(1 + e) would round to 0
  CHECK_CLOSE(softplus2(-30.f * kLog2E) * kLn2 / std::exp(-30.0), 1.0, 1e-6);
  CHECK(softplus2(kNegInf) == 0.f && sigmoid2(kNegInf) == 0.f);  // masked entries drop out
  CHECK(softplus2(INFINITY) == INFINITY && sigmoid2(INFINITY) == 1.f);
  CHECK(std::isnan(softplus2(NAN)) && std::isnan(sigmoid2(NAN)));
}

void test_entry_mask() {
  // A tile corner at (row_base, col_base) = (100, 130) of a 120 x 140 matrix, diagonal offset 28.
  const EntryMask mask = entry_mask<128>(100, 130, 120, 140, true, 28);
  CHECK(mask.rows_left == 20 && mask.cols_left == 10);
  for (int r = 0; r < 128; ++r) {
    for (int c = 0; c < 128; ++c) {
      const int64_t row = 100 + r, col = 130 + c;
      const bool want = row >= 120 || col >= 140 || col - row == 28;
      CHECK(mask.excludes(r, c) == want);
    }
  }
  CHECK(entry_mask<128>(0, 0, 500, 500, true, 200).diagonal == EntryMask::kNoDiagonal);  // outside the span
  CHECK(entry_mask<128>(0, 0, 500, 500, false, 0).diagonal == EntryMask::kNoDiagonal);
  CHECK(entry_mask<128>(0, int64_t{3} << 40, 5, (int64_t{3} << 40) + 1, true, int64_t{3} << 40).diagonal == 0);
}

void test_labels_exclude() {
  // Labels that differ only above bit 31 are different labels.
  const int64_t high = int64_t{1} << 32;
  const int64_t labels[] = {7, 7 + high, -1, 0, -high};
  for (const int64_t row : labels) {
    for (const int64_t col : labels) {
      CHECK(labels_exclude(row, col, true) == (row == col));
      CHECK(labels_exclude(row, col, false) == (row != col));
    }
  }
}

void test_index_math() {
  CHECK(ceil_div(0, 64) == 0 && ceil_div(1, 64) == 1 && ceil_div(64, 64) == 1 && ceil_div(65, 64) == 2);
  for (int64_t count = 1; count < 60; ++count) {
    for (int64_t parts = 1; parts <= count; ++parts) {
      const ColumnSplit split = column_split(count, parts);
      int expected_begin = 0;
      for (int part = 0; part < parts; ++part) {
        const TileRange range = split_tiles(split, part);
        CHECK(range.begin == expected_begin && range.end > range.begin && range.end - range.begin <= count / parts + 1);
        expected_begin = range.end;
      }
      CHECK(expected_begin == count);
    }
  }
  for (int64_t row_blocks : {1, 2, 7, 512}) {
    for (int64_t tiles : {1, 3, 512}) {
      const int64_t splits = column_splits_for(row_blocks, tiles, 264);
      CHECK(splits >= 1 && splits <= tiles && (row_blocks * splits >= 264 || splits == tiles));
    }
  }
  CHECK(column_splits_for(2, 512, 264) == 132);  // N = 256 against M = 65536: every SM busy
}

bool aligned(size_t offset) { return offset % kWorkspaceAlignment == 0; }

void test_forward_plan() {
  const int64_t sizes[] = {1, 63, 128, 129, 1000, 4097, 70000, 1 << 20};
  for (int64_t n : sizes) {
    for (int64_t m : sizes) {
      for (bool with_columns : {false, true}) {
        for (size_t limit : {size_t{1}, size_t{1} << 20, size_t{256} << 20}) {
          const ForwardPlan plan = plan_forward(n, m, with_columns, sizeof(LseState), 132, limit);
          CHECK(plan.row_blocks == ceil_div(n, kTileRows));
          CHECK(plan.row_blocks_per_launch >= 1 && plan.row_blocks_per_launch <= plan.row_blocks &&
                plan.row_blocks_per_launch <= kMaxGridY);
          CHECK(aligned(plan.column_partials_offset) && aligned(plan.column_states_offset) &&
                aligned(plan.workspace_bytes));
          // room for the row partials of the largest split count a launch can use
          const int64_t splits =
              column_splits_for(plan.row_blocks_per_launch, ceil_div(m, kTileCols), 132 * kMaxCtasPerSm);
          CHECK(plan.column_partials_offset >=
                plan.row_partials_offset + static_cast<size_t>(splits * n) * sizeof(LseState));
          if (with_columns) {
            CHECK(plan.column_states_offset >= plan.column_partials_offset + static_cast<size_t>(
                                                   plan.row_blocks_per_launch * m) * sizeof(LseState));
            CHECK(plan.workspace_bytes >= plan.column_states_offset + static_cast<size_t>(m) * sizeof(LseState));
            // bounded: the column partials stay under the limit unless one row block exceeds it
            const size_t partials = static_cast<size_t>(plan.row_blocks_per_launch * m) * sizeof(LseState);
            CHECK(partials <= limit || plan.row_blocks_per_launch == 1);
          }
        }
      }
    }
  }
}

void test_weights_plan() {
  // Rows [row_start, row_stop) lie in the plan's row blocks, which are the forward's.
  for (int64_t row_start : {0, 1, 127, 128, 1000}) {
    for (int64_t rows : {1, 2, 127, 128, 129, 4096}) {
      const WeightsPlan plan = plan_weights(65536, row_start, row_start + rows, 264);
      CHECK(plan.first_row_block * kTileRows <= row_start && row_start < (plan.first_row_block + 1) * kTileRows);
      CHECK((plan.first_row_block + plan.row_blocks) * kTileRows >= row_start + rows);
      CHECK((plan.first_row_block + plan.row_blocks - 1) * kTileRows < row_start + rows);
      CHECK(plan.splits >= 1 && plan.splits <= 512 && (plan.splits * plan.row_blocks >= 264 || plan.splits == 512));
    }
  }
}

}  // namespace

int main() {
  test_lse_merge();
  test_nan_max();
  test_elementwise();
  test_entry_mask();
  test_labels_exclude();
  test_index_math();
  test_forward_plan();
  test_weights_plan();
  std::printf("%d checks, %d failures\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
