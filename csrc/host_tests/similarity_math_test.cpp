// Host-side unit tests of the code the CUDA kernels share with the host: similarity_math.h and
// launch_plan.h, compiled with the plain host compiler (tests/test_cuda_host.py builds and runs
// this). Prints one line per failure and exits non-zero if there was any.
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

double direct_lse(const std::vector<float>& values) {
  double max = -kInf;
  for (float v : values) max = std::fmax(max, v);
  if (max == -kInf) return -kInf;
  long double sum = 0;
  for (float v : values) sum += std::exp(static_cast<long double>(v) - max);
  return max + std::log(static_cast<double>(sum));
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
  CHECK_CLOSE(lse_finish(ab), std::log(3.0 * std::exp(2.0) + std::exp(5.0)), 1e-6);

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

void test_lse_of_values() {
  std::mt19937 rng(2);
  for (int trial = 0; trial < 100; ++trial) {
    const std::vector<float> values = random_values(rng, 32, 50.f, trial % 4 == 0 ? 0.9 : 0.1);
    const LseState state = LseReduction::of_values<32>([&](int t) { return values[t]; });
    CHECK_CLOSE(LseReduction::finish(state), direct_lse(values), 1e-6);
  }
  const std::vector<float> masked(32, kNegInf);
  const LseState none = lse_of_values<32>([&](int t) { return masked[t]; });
  CHECK(none.max == kNegInf && none.sum == 0.f && lse_finish(none) == kNegInf);
  const LseState nan = lse_of_values<2>([](int t) { return t == 0 ? 1.f : NAN; });
  CHECK(std::isnan(lse_finish(nan)));  // a NaN input is not silently dropped
}

void test_elementwise() {
  const float xs[] = {-1e30f, -200.f, -88.f, -20.f, -1.f, -1e-8f, 0.f, 1e-8f, 1.f, 20.f, 88.f, 200.f, 1e30f};
  for (float x : xs) {
    const long double e = std::exp(-std::fabs(static_cast<long double>(x)));
    const long double softplus_want = std::fmax(static_cast<long double>(x), 0.0L) + std::log1p(e);
    const long double sigmoid_want = x >= 0 ? 1 / (1 + e) : e / (1 + e);
    CHECK_CLOSE(softplus(x), static_cast<double>(softplus_want), 1e-6);
    CHECK_CLOSE(sigmoid(x), static_cast<double>(sigmoid_want), 1e-6);
  }
  CHECK(softplus(kNegInf) == 0.f && sigmoid(kNegInf) == 0.f);  // masked entries drop out
  CHECK(softplus(INFINITY) == INFINITY && sigmoid(INFINITY) == 1.f);
  CHECK(std::isnan(softplus(NAN)) && std::isnan(sigmoid(NAN)));
  CHECK(softmax_share(kNegInf, kNegInf) == 0.f);  // an entirely masked row
  CHECK(softmax_share(kNegInf, 3.f) == 0.f);
  CHECK_CLOSE(softmax_share(1.f, 3.f), std::exp(-2.0), 1e-6);
}

void test_weights() {
  const float lse_row[] = {kNegInf, 0.5f};
  const float lse_col[] = {1.f, 2.f};
  const float grad_row[] = {7.f, 0.25f};
  const float grad_col[] = {-1.f, 3.f};
  const LseWeight both{lse_row, lse_col, grad_row, grad_col};
  const LseWeight rows_only{lse_row, nullptr, grad_row, nullptr};
  const LseWeight cols_only{nullptr, lse_col, nullptr, grad_col};
  CHECK(both(kNegInf, 0, 1) == 0.f);  // masked entry of a fully masked row: 0, not NaN
  CHECK_CLOSE(both(0.2f, 1, 1), 0.25 * std::exp(0.2 - 0.5) + 3.0 * std::exp(0.2 - 2.0), 1e-6);
  CHECK_CLOSE(rows_only(0.2f, 1, 0), 0.25 * std::exp(0.2 - 0.5), 1e-6);
  CHECK_CLOSE(cols_only(0.2f, 1, 0), -1.0 * std::exp(0.2 - 1.0), 1e-6);
  const SoftplusWeight sigmoid_weight{grad_row};
  CHECK_CLOSE(sigmoid_weight(0.3f, 1, 0), 0.25 / (1 + std::exp(-0.3)), 1e-6);
  CHECK(sigmoid_weight(kNegInf, 0, 0) == 0.f);
}

void test_index_math() {
  CHECK(ceil_div(0, 64) == 0 && ceil_div(1, 64) == 1 && ceil_div(64, 64) == 1 && ceil_div(65, 64) == 2);
  for (int64_t count = 1; count < 60; ++count) {
    for (int64_t parts = 1; parts <= count; ++parts) {
      int64_t expected_begin = 0;
      for (int64_t part = 0; part < parts; ++part) {
        const IndexRange range = split_range(count, parts, part);
        CHECK(range.begin == expected_begin && range.end > range.begin);
        expected_begin = range.end;
      }
      CHECK(expected_begin == count);
    }
  }
  CHECK(!is_masked(3, 3, false, 0));
  CHECK(is_masked(3, 3, true, 0) && !is_masked(3, 4, true, 0));
  CHECK(is_masked(2, 7, true, 5) && !is_masked(7, 2, true, 5));
  CHECK(is_masked(7, 2, true, -5));
  CHECK(is_masked(0, int64_t{3} << 40, true, int64_t{3} << 40));  // 64-bit offsets
}

bool aligned(size_t offset) { return offset % kWorkspaceAlignment == 0; }

void test_forward_plan() {
  const int64_t sizes[] = {1, 63, 64, 65, 1000, 4097, 70000, 1 << 20};
  for (int64_t n : sizes) {
    for (int64_t m : sizes) {
      for (bool with_columns : {false, true}) {
        for (size_t limit : {size_t{1}, size_t{1} << 20, size_t{256} << 20}) {
          const ForwardPlan plan = plan_forward(n, m, with_columns, sizeof(LseState), 132, limit);
          CHECK(plan.row_blocks == ceil_div(n, kTileRows));
          CHECK(plan.row_blocks_per_launch >= 1 && plan.row_blocks_per_launch <= plan.row_blocks &&
                plan.row_blocks_per_launch <= kMaxGridY);
          CHECK(plan.column_splits >= 1 && plan.column_splits <= ceil_div(m, kTileCols));
          CHECK(aligned(plan.column_partials_offset) && aligned(plan.column_states_offset) &&
                aligned(plan.workspace_bytes));
          CHECK(plan.column_partials_offset >= plan.row_partials_offset +
                                                   static_cast<size_t>(plan.column_splits * n) * sizeof(LseState));
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

void test_backward_plan() {
  const int64_t sizes[] = {1, 63, 64, 65, 1000, 70000, 1 << 22};
  for (int64_t n : sizes) {
    for (int64_t m : sizes) {
      for (size_t limit : {size_t{1}, size_t{64} << 20, size_t{256} << 20}) {
        const BackwardPlan plan = plan_backward(n, m, true, limit);
        CHECK(plan.chunk_rows % kTileRows == 0 && plan.chunk_rows >= kTileRows);
        CHECK(plan.chunk_rows <= ceil_div(n, kTileRows) * kTileRows);
        CHECK(plan.chunk_rows / kTileRows <= kMaxGridY);
        CHECK(plan.weights_ld >= m && plan.weights_ld % 4 == 0);
        const size_t weights = static_cast<size_t>(plan.chunk_rows * plan.weights_ld) * sizeof(float);
        CHECK(weights <= limit || plan.chunk_rows == kTileRows);
        CHECK(aligned(plan.tile_sums_offset) && plan.tile_sums_offset >= weights);
        CHECK(plan.workspace_bytes >= plan.tile_sums_offset + static_cast<size_t>(plan.chunk_rows / kTileRows *
                                                                                   ceil_div(m, kTileCols)) *
                                                                   sizeof(float));
      }
    }
  }
}

// The forward's decomposition, replayed on the host with the shared reductions: row statistics
// over (split, tile, thread part) then across splits; column statistics per row block, folded
// launch by launch. Every entry must be counted exactly once.
void test_forward_decomposition() {
  std::mt19937 rng(3);
  const int64_t n = 300, m = 453, offset = 5;
  std::vector<float> s(n * m);
  for (float& x : s) x = std::uniform_real_distribution<float>(-20.f, 20.f)(rng);
  auto entry = [&](int64_t i, int64_t j) {
    return i < n && j < m && !is_masked(i, j, true, offset) ? s[i * m + j] : kNegInf;
  };
  const ForwardPlan plan = plan_forward(n, m, true, sizeof(LseState), 2, 3 * m * sizeof(LseState));
  CHECK(plan.row_blocks_per_launch == 3 && plan.column_splits > 1);  // several launches and splits
  const int64_t column_tiles = ceil_div(m, kTileCols);
  std::vector<LseState> row_partials(plan.column_splits * n), column_states(m, lse_empty());
  for (int64_t first = 0; first < plan.row_blocks; first += plan.row_blocks_per_launch) {
    const int64_t launch_blocks = std::min(plan.row_blocks_per_launch, plan.row_blocks - first);
    std::vector<LseState> column_partials(launch_blocks * m);
    for (int64_t y = 0; y < launch_blocks; ++y) {
      for (int64_t split = 0; split < plan.column_splits; ++split) {
        const IndexRange tiles = split_range(column_tiles, plan.column_splits, split);
        for (int64_t r = 0; r < kTileRows; ++r) {
          const int64_t i = (first + y) * kTileRows + r;
          LseState state = lse_empty();
          for (int64_t tile = tiles.begin; tile < tiles.end; ++tile) {
            for (int part = 0; part < 2; ++part) {
              const int64_t j0 = tile * kTileCols + part * 32;
              state = lse_merge(state, lse_of_values<32>([&](int t) { return entry(i, j0 + t); }));
            }
            if (r == 0) {  // the tile's column pass, once per tile
              for (int64_t c = 0; c < kTileCols; ++c) {
                const int64_t j = tile * kTileCols + c, i0 = (first + y) * kTileRows;
                const LseState top = lse_of_values<32>([&](int t) { return entry(i0 + t, j); });
                const LseState bottom = lse_of_values<32>([&](int t) { return entry(i0 + 32 + t, j); });
                if (j < m) column_partials[y * m + j] = lse_merge(top, bottom);
              }
            }
          }
          if (i < n) row_partials[split * n + i] = state;
        }
      }
    }
    for (int64_t j = 0; j < m; ++j) {
      for (int64_t y = 0; y < launch_blocks; ++y) column_states[j] = lse_merge(column_states[j], column_partials[y * m + j]);
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    LseState state = lse_empty();
    for (int64_t split = 0; split < plan.column_splits; ++split) state = lse_merge(state, row_partials[split * n + i]);
    std::vector<float> row;
    for (int64_t j = 0; j < m; ++j) row.push_back(entry(i, j));
    CHECK_CLOSE(lse_finish(state), direct_lse(row), 1e-6);
  }
  for (int64_t j = 0; j < m; ++j) {
    std::vector<float> col;
    for (int64_t i = 0; i < n; ++i) col.push_back(entry(i, j));
    CHECK_CLOSE(lse_finish(column_states[j]), direct_lse(col), 1e-6);
  }
}

}  // namespace

int main() {
  test_lse_merge();
  test_lse_of_values();
  test_elementwise();
  test_weights();
  test_index_math();
  test_forward_plan();
  test_backward_plan();
  test_forward_decomposition();
  std::printf("%d checks, %d failures\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
