// Paged-attention decode: one query token per sequence over its paged KV context.
//
// This file is the *body* of an `mx.fast.metal_kernel`: MLX generates the signature from the
// input/output names (q, k_pool, v_pool, block_tables, context_lens, scale -> o_part, ml_part)
// and the template parameters T (dtype), D (head_dim), BS (block_size), G (query heads per KV
// head), NSG (simdgroups per threadgroup) and PART (tokens per partition). Batch size, number of
// blocks, context lengths and scale are runtime values: one compiled kernel serves every step.
//
// Memory layout
//   q            [B, Hq, D]                 Hq = Hkv * G (GQA: query heads g*G .. g*G+G-1 share KV head g)
//   k_pool/v_pool [Hkv, num_blocks, BS, D]  token t of sequence b lives in block
//                                           block_tables[b, t / BS] at offset t % BS
//                                           (head-major: see metal_kernels/reference.py)
//   o_part       [B, Hq, P, D]  float32     per-partition output, already divided by its own sum
//   ml_part      [B, Hq, P, 2]  float32     per-partition (max score m, sum of exp l)
//
// Grid mapping (MLX's grid counts threads): grid = (P * NSG * 32, Hkv, B), threadgroup =
// (NSG * 32, 1, 1). Threadgroup (p, h, b) handles partition p (tokens [p*PART, (p+1)*PART)) of
// sequence b for KV head h and *all G query heads that share it*, so each K/V element read from
// device memory serves G dot products. Inside, simdgroup s takes tokens p*PART + s, + NSG, ...;
// each of its 32 lanes holds D/32 consecutive elements of q, k, v and the output.
//
// Metal names are spelled out (metal::...) so the body does not rely on `using namespace metal`.
//
// Pass 1 (this kernel): per simdgroup, an online softmax over its tokens in fp32:
//   s = q.k * scale (a simd_sum over lanes);  m' = max(m, s);
//   l' = l * exp(m - m') + exp(s - m');       o' = o * exp(m - m') + exp(s - m') * v
// then the NSG simdgroups merge through threadgroup memory (the same rescaling, see below) and
// write one (o / l, m, l) per partition. Rows with no token in a partition write (0, -inf, 0).
//
// Pass 2 (MLX ops in metal_kernels/kernel.py, skipped when P == 1): partial softmaxes
// (o_p, m_p, l_p) over disjoint token sets merge exactly as
//   M = max_p m_p,  w_p = l_p * exp(m_p - M),  out = sum_p w_p * o_p / sum_p w_p
// because each o_p is normalized by l_p and exp(m_p - M) rescales every partial sum to the
// common maximum; nothing is approximated.

constexpr int EPT = (D + 31) / 32;  // head_dim elements per lane (the last lanes may idle,
                                    // e.g. D = 80: lanes 0..26 hold 3 elements, 26 only 2)

const uint lane = thread_index_in_simdgroup;
const uint sg = simdgroup_index_in_threadgroup;
const int part = threadgroup_position_in_grid.x;
const int kv_head = threadgroup_position_in_grid.y;
const int b = threadgroup_position_in_grid.z;
const int num_parts = threadgroups_per_grid.x;
const int num_kv_heads = threadgroups_per_grid.y;
const int num_q_heads = num_kv_heads * G;
const int max_blocks = block_tables_shape[1];
const int num_blocks = k_pool_shape[1];
const int context_len = context_lens[b];
const int t_begin = part * PART;
const int t_end = metal::min(context_len, t_begin + PART);
const int d0 = lane * EPT;                   // this lane's first element
const int n_mine = metal::clamp(D - d0, 0, EPT);    // how many of its EPT slots are real

// Per-lane registers: this lane's slice of each query head, its running output, max and sum.
float q_reg[G][EPT];
float o_reg[G][EPT];
float m_reg[G];
float l_reg[G];
for (int g = 0; g < G; g++) {
  const device T* q_row = q + ((size_t)b * num_q_heads + kv_head * G + g) * D + d0;
  for (int i = 0; i < EPT; i++) {
    q_reg[g][i] = i < n_mine ? float(q_row[i]) * scale : 0.0f;
    o_reg[g][i] = 0.0f;
  }
  m_reg[g] = -INFINITY;
  l_reg[g] = 0.0f;
}

for (int t = t_begin + (int)sg; t < t_end; t += NSG) {
  const int block = block_tables[b * max_blocks + t / BS];
  const size_t base = (((size_t)kv_head * num_blocks + block) * BS + t % BS) * D + d0;
  float k_reg[EPT];
  float v_reg[EPT];
  for (int i = 0; i < EPT; i++) {
    k_reg[i] = i < n_mine ? float(k_pool[base + i]) : 0.0f;
    v_reg[i] = i < n_mine ? float(v_pool[base + i]) : 0.0f;
  }
  for (int g = 0; g < G; g++) {
    float score = 0.0f;
    for (int i = 0; i < EPT; i++) {
      score += q_reg[g][i] * k_reg[i];
    }
    score = metal::simd_sum(score);
    const float m_new = metal::max(m_reg[g], score);
    const float rescale = metal::fast::exp(m_reg[g] - m_new);
    const float weight = metal::fast::exp(score - m_new);
    l_reg[g] = l_reg[g] * rescale + weight;
    for (int i = 0; i < EPT; i++) {
      o_reg[g][i] = o_reg[g][i] * rescale + weight * v_reg[i];
    }
    m_reg[g] = m_new;
  }
}

// Merge the NSG simdgroups' partial softmaxes through threadgroup memory.
threadgroup float tg_o[NSG * G * D];
threadgroup float tg_m[NSG * G];
threadgroup float tg_l[NSG * G];
for (int g = 0; g < G; g++) {
  for (int i = 0; i < n_mine; i++) {
    tg_o[(sg * G + g) * D + d0 + i] = o_reg[g][i];
  }
  if (lane == 0) {
    tg_m[sg * G + g] = m_reg[g];
    tg_l[sg * G + g] = l_reg[g];
  }
}
metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);

if (sg == 0) {
  for (int g = 0; g < G; g++) {
    float m_all = -INFINITY;
    for (int s = 0; s < NSG; s++) {
      m_all = metal::max(m_all, tg_m[s * G + g]);
    }
    float l_all = 0.0f;
    float acc[EPT];
    for (int i = 0; i < EPT; i++) {
      acc[i] = 0.0f;
    }
    for (int s = 0; s < NSG; s++) {
      // A simdgroup that saw no token has l = 0 (and m = -inf): it must weigh nothing.
      const float w = tg_l[s * G + g] > 0.0f ? metal::fast::exp(tg_m[s * G + g] - m_all) : 0.0f;
      l_all += w * tg_l[s * G + g];
      for (int i = 0; i < n_mine; i++) {
        acc[i] += w * tg_o[(s * G + g) * D + d0 + i];
      }
    }
    const float inv_l = l_all > 0.0f ? 1.0f / l_all : 0.0f;
    const size_t row = ((size_t)b * num_q_heads + kv_head * G + g) * num_parts + part;
    for (int i = 0; i < n_mine; i++) {
      o_part[row * D + d0 + i] = acc[i] * inv_l;
    }
    if (lane == 0) {
      ml_part[row * 2] = m_all;
      ml_part[row * 2 + 1] = l_all;
    }
  }
}
