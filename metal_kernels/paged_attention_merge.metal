// Paged-attention decode, pass 2: merge each row's partition partials and write the model's dtype.
//
// The body of an `mx.fast.metal_kernel` (inputs o_part, ml_part, sinks -> out; template T, D).
//   o_part  [B, Hq, P, D] float32   partition p's output, already divided by its own sum l_p
//   ml_part [B, Hq, P, 2] float32   partition p's (max score m_p, sum of exp l_p)
//   sinks   [Hq]          float32   each head's sink logit; -inf: no sink
//   out     [B, Hq, D]    T
// Grid (32, Hq, B), threadgroups of 32: one simdgroup per (sequence, query head), each lane
// holding D/32 consecutive elements.
//
// Partial softmaxes over disjoint token sets merge exactly as
//   M = max_p m_p,  w_p = l_p * exp(m_p - M),  out = sum_p w_p * o_p / sum_p w_p
// because each o_p is normalized by l_p and exp(m_p - M) rescales every partial sum to the
// common maximum; nothing is approximated. A partition without tokens has l_p = 0 and weighs
// nothing; a row without any token (context 0: a padding row) writes zeros. A sink s (gpt-oss)
// is one more logit with no value: M also covers s, and exp(s - M) joins the denominator only.

constexpr int EPT = (D + 31) / 32;

const uint lane = thread_index_in_simdgroup;
const int num_q_heads = o_part_shape[1];
const int num_parts = o_part_shape[2];
const size_t row = (size_t)threadgroup_position_in_grid.z * num_q_heads + threadgroup_position_in_grid.y;
const float sink = sinks[threadgroup_position_in_grid.y];
const int d0 = lane * EPT;
const int n_mine = metal::clamp(D - d0, 0, EPT);

float m_all = sink;
for (int p = 0; p < num_parts; p++) {
  m_all = metal::max(m_all, ml_part[(row * num_parts + p) * 2]);
}
float total = sink > -INFINITY ? metal::fast::exp(sink - m_all) : 0.0f;
float acc[EPT];
for (int i = 0; i < EPT; i++) {
  acc[i] = 0.0f;
}
for (int p = 0; p < num_parts; p++) {
  const float l = ml_part[(row * num_parts + p) * 2 + 1];
  const float w = l > 0.0f ? l * metal::fast::exp(ml_part[(row * num_parts + p) * 2] - m_all) : 0.0f;
  total += w;
  const device float* o_row = o_part + (row * num_parts + p) * D + d0;
  for (int i = 0; i < n_mine; i++) {
    acc[i] += w * o_row[i];
  }
}
const float inv_total = total > 0.0f ? 1.0f / total : 0.0f;
for (int i = 0; i < n_mine; i++) {
  out[row * D + d0 + i] = static_cast<T>(acc[i] * inv_total);
}
